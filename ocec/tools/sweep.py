"""`ocec sweep`: search fine-tuning recipes and hyper-parameters with Optuna (TPE, pruners, shared storages).

Each trial is a real `python -m ocec train ...` process with its own run folder DIR/trial_NNNN/vN: the
command printed for the best trial is exactly what ran. The sweep process asks Optuna for parameters,
starts up to --n_jobs trial processes, reads each one's history.json after every epoch, reports its val
F1 to Optuna (whose pruner may stop it: SIGTERM, which the trainer answers with a resumable checkpoint)
and tells Optuna the best val F1 when it ends. Several sweep processes, on one machine or many, share a
study through its storage (default: an SQLite file in DIR); RDB storages keep a heartbeat, so the trials
of a killed sweep are marked failed when the next one starts.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UserError
from ..core.progress import progress
from ..engine.rundir import latest_run_dir
from .sweep_space import load_space, suggest, trial_flags, trial_recipe
from .sweep_study import claim_final_run, enqueue_defaults, open_study, resumable_retry

log = logging.getLogger("ocec")

# Starts a trial so that it gets SIGTERM if the sweep dies (Linux prctl PR_SET_PDEATHSIG, kept across exec):
# a killed sweep leaves no orphan trials; each saves a resumable checkpoint and stops.
DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("ocec sweep needs Optuna: pip install 'ocec[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The sweep drives trials with ask/tell and records heartbeats itself (its trials are processes it
    # watches, not functions Study.optimize calls): Optuna warns about both, needlessly here.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    return optuna


# --- running trials ---------------------------------------------------------------------------------


@dataclass
class Running:
    trial: object
    process: subprocess.Popen
    folder: Path
    command: list[str]
    started: float
    device: str | None = None
    reported: int = 0
    pruned: bool = False


def trial_command(
    fixed: list[str], params: dict, pretrain: list[str], folder: Path, device: str | None, fixed_settings: dict
) -> list[str]:
    """The trial's flags first, the user's fixed flags after them: argparse keeps the last value, so what the
    user fixed is what runs."""
    searched = trial_flags(params, pretrain, fixed_settings)
    command = ["python", "-m", "ocec", "train", *searched, *fixed, "--output_dir", str(folder)]
    return command + (["--device", device] if device else [])


def pick_device(devices: list[str], busy: list[str]) -> str | None:
    """The device running the fewest trials (the first of them on a tie): a trial that ends frees its device."""
    if not devices:
        return None
    return min(devices, key=lambda d: (busy.count(d), devices.index(d)))


def _history(folder: Path) -> list[dict]:
    run = latest_run_dir(folder)
    if run is None:
        return []
    try:
        return json.loads((run / "history.json").read_text())
    except (OSError, ValueError):  # not written yet (it is replaced atomically, never half-written)
        return []


def run_sweep(
    *,
    output_dir: str,
    trials: int,
    fixed: list[str],
    pretrain: list[str],
    mix: bool,
    space_file: str | None,
    storage: str | None,
    study_name: str,
    timeout: float | None,
    n_jobs: int,
    devices: list[str],
    pruner: str,
    seed: int,
    heartbeat: int,
    plot: bool,
    fixed_settings: dict | None = None,
    final_run: bool = False,
) -> dict:
    """Run up to `trials` trials of the study; -> the leaderboard (with `final_run`: and whether this
    process claimed the final training of the best trial, see claim_final_run)."""
    optuna = require_optuna()
    fixed_settings = fixed_settings or {}
    folder = Path(output_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    space = load_space(space_file, pretrain=bool(pretrain), mix=mix, fixed=fixed_settings)
    study, store, created = open_study(optuna, folder, storage, study_name, pruner, seed, heartbeat)
    if created:  # once per study: by the process that created it, never by a rerun or a second process
        enqueue_defaults(study, space, pretrain)
    stop = {"requested": 0}
    previous = signal.signal(signal.SIGINT, lambda *_: _request_stop(stop))
    running: list[Running] = []
    started = time.time()
    launched = 0
    bar = progress(total=trials, desc="sweep", unit="trial")
    try:
        while launched < trials or running:
            timed_out = timeout is not None and time.time() - started > timeout
            while launched < trials and len(running) < n_jobs and not stop["requested"] and not timed_out:
                trial = study.ask()
                params = suggest(trial, space)
                trial_folder = folder / f"trial_{trial.number:04d}"
                device = pick_device(devices, [r.device for r in running])
                command = trial_command(fixed, params, pretrain, trial_folder, device, fixed_settings)
                trial.set_user_attr("command", shlex.join(command))
                trial.set_user_attr("recipe", trial_recipe(params, pretrain, fixed_settings))
                resumed = resumable_retry(optuna, study, trial, folder)
                if resumed is not None:  # a trial of a killed sweep, re-queued: continue its checkpoint
                    trial_folder = resumed.parent.parent  # trial_NNNN of the killed trial (resumed: .../vK/*.pt)
                    command = ["python", "-m", "ocec", "train", "--resume", str(resumed)]
                    command += ["--device", device] if device else []
                    trial.set_user_attr("resumed", str(resumed))
                    log.info("sweep: trial %d continues %s", trial.number, resumed)
                trial_folder.mkdir(parents=True, exist_ok=True)
                # stderr to a file, not a pipe: a pipe read only at the end fills up (64 KB) and blocks a chatty trial
                with open(trial_folder / "stderr.log", "ab" if resumed else "wb") as errors:
                    process = subprocess.Popen(
                        [sys.executable, "-c", DIE_WITH_PARENT, *command[1:]],
                        stdout=subprocess.DEVNULL,
                        stderr=errors,
                        start_new_session=True,  # Ctrl-C in the terminal reaches the sweep, not its trials
                        env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    )
                running.append(Running(trial, process, trial_folder, command, time.time(), device=device))
                running[-1].reported = len(_history(trial_folder)) if resumed else 0  # inherited by the retry
                launched += 1
            if stop["requested"] > 1:
                for r in running:
                    r.process.terminate()
            if not running and (stop["requested"] or timed_out):
                break
            time.sleep(0.5)
            for r in list(running):
                _follow(study, r)
                if r.process.poll() is not None:
                    _finish(study, r)
                    running.remove(r)
                    bar.update(1)
                    bar.set_postfix(best=_best_value(study))
            if heartbeat and hasattr(store, "record_heartbeat"):  # RDB storages: the trials are alive
                for r in running:
                    store.record_heartbeat(r.trial._trial_id)  # Trial has no public id accessor
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    result = leaderboard(study, folder)
    if final_run and result["best"] is not None:
        result["final_claimed"] = claim_final_run(optuna, store, study_name, result["best"]["trial"])
    if plot:
        result["plots"] = write_plots(optuna, study, folder)
    return result


def _request_stop(stop: dict) -> None:
    stop["requested"] += 1
    if stop["requested"] == 1:
        log.warning("sweep: stopping after the running trial(s) are recorded; Ctrl-C again to stop them now")
    else:
        log.warning("sweep: stopping the running trial(s) now; they are recorded as failed")


def _follow(study, r: Running) -> None:
    """Report each new epoch's val F1 to Optuna; stop the trial if the pruner says so."""
    rows = _history(r.folder)
    for row in rows[r.reported :]:
        value = row.get("val_f1")
        if value is not None:
            r.trial.report(float(value), int(row["epoch"]))
        r.reported = len(rows)
        if not r.pruned and value is not None and r.trial.should_prune():
            r.pruned = True
            r.process.terminate()


def _finish(study, r: Running) -> None:
    optuna = require_optuna()
    rows = _history(r.folder)
    scores = [row["val_f1"] for row in rows if row.get("val_f1") is not None]
    best = max(scores, default=None)
    run = latest_run_dir(r.folder)
    attrs = {
        "best_f1": best,
        "best_epoch": rows[scores.index(best)]["epoch"] if scores else None,
        "epochs": len(rows),
        "seconds": round(time.time() - r.started, 1),
        "run_dir": str(run) if run else None,
    }
    for key, value in attrs.items():
        r.trial.set_user_attr(key, value)
    code = r.process.returncode
    if r.pruned:
        study.tell(r.trial, state=optuna.trial.TrialState.PRUNED)
    elif code == 0 and best is not None:
        study.tell(r.trial, best)
    else:
        text = (r.folder / "stderr.log").read_text(errors="replace") if (r.folder / "stderr.log").exists() else ""
        error = (text.strip().splitlines() or [""])[-1]
        r.trial.set_user_attr("error", f"exit {code}: {error}"[:300])
        log.warning("sweep: trial %d failed (exit %s): %s", r.trial.number, code, error[:200])
        study.tell(r.trial, state=optuna.trial.TrialState.FAIL)


def _best_value(study) -> str:
    try:
        return f"{study.best_value:.4f}"
    except ValueError:
        return "-"


# --- results --------------------------------------------------------------------------------------


def leaderboard(study, folder: Path) -> dict:
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "recipe": attrs.get("recipe", t.params.get("recipe", "scratch")),
                **{k: v for k, v in t.params.items() if k != "recipe"},
                "best_f1": attrs.get("best_f1"),
                "best_epoch": attrs.get("best_epoch"),
                "seconds": attrs.get("seconds"),
                "run_dir": attrs.get("run_dir"),
                "command": attrs.get("command"),
                "error": attrs.get("error"),
                "resumed": attrs.get("resumed"),  # the checkpoint of a killed sweep's trial it continued
            }
        )
    rows.sort(key=lambda r: (r["state"] != "complete", -(r["best_f1"] or -1), r["trial"]))
    complete = [r for r in rows if r["state"] == "complete"]
    best = complete[0] if complete else None
    (folder / "leaderboard.json").write_text(json.dumps(rows, indent=2) + "\n")
    _write_csv(folder / "leaderboard.csv", rows)
    return {"rows": rows, "best": best, "study": study.study_name}


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv
    import io

    from ..core.fileio import write_text_atomic

    columns = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def format_leaderboard(result: dict, limit: int = 20) -> str:
    keys = [
        "lr",
        "backbone_lr_ratio",
        "weight_decay",
        "warmup_epochs",
        "ema_decay",
        "bn_adapt",
        "augment",
        "margin_method",
        "mix_ratio",
    ]
    present = [k for k in keys if any(k in r for r in result["rows"])]
    header = f"{'trial':>5} {'state':>8} {'recipe':>12} {'best F1':>8} {'epoch':>5} {'seconds':>8}  " + " ".join(
        f"{k:>12}" for k in present
    )
    lines = [header]
    for r in result["rows"][:limit]:
        cells = [_cell(r.get(k)) for k in present]
        f1 = f"{r['best_f1']:.4f}" if r["best_f1"] is not None else "-"
        lines.append(
            f"{r['trial']:>5} {r['state']:>8} {r['recipe']:>12} {f1:>8} {str(r['best_epoch'] or '-'):>5} "
            f"{str(r['seconds'] or '-'):>8}  " + " ".join(f"{c:>12}" for c in cells)
        )
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def write_plots(optuna, study, folder: Path) -> list[str]:
    from ..core.plots import require_matplotlib

    plt = require_matplotlib("--plot")
    from optuna.visualization import matplotlib as views

    written = []
    for name, draw in (("history", views.plot_optimization_history), ("importances", views.plot_param_importances)):
        try:
            axes = draw(study)
        except (ValueError, RuntimeError) as exc:  # e.g. importances need two complete trials
            log.warning("--plot: no %s plot (%s)", name, str(exc).splitlines()[0][:120])
            continue
        path = folder / f"sweep_{name}.png"
        axes.figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(axes.figure)
        written.append(str(path))
    return written
