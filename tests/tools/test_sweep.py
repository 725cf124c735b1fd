"""`ocec sweep`: real train() trials under Optuna; resume, shared storages, killed trials, reproducible best."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_subprocess, summary

pytest.importorskip("optuna", reason="the sweep extra is not installed")

# Two quick epochs per trial; the pruner off unless a test wants it, so every trial completes. (No --lr:
# a flag given to a sweep stays fixed, and these tests want the learning rate searched.)
SWEEP = ["--epochs", 2, "--batch_size", 32, "--num_workers", 0, "--device", "cpu", "--pruner", "none"]


def _sweep(*args, **kwargs) -> subprocess.CompletedProcess:
    return run_subprocess("sweep", *args, timeout=600, **kwargs)


def _board(folder: Path) -> list[dict]:
    return json.loads((folder / "leaderboard.json").read_text())


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ocec", "sweep", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_for(path: Path, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def test_a_sweep_leads_with_the_defaults_and_a_rerun_continues_the_study(data_b, trained_run, tmp_path):
    args = ["--data_root", data_b, "--pretrain", trained_run, "--output_dir", tmp_path, *SWEEP]
    result = _sweep(*args, "--trials", 3)
    assert result.returncode == 0, result.stderr
    board = _board(tmp_path)
    by_trial = {r["trial"]: r for r in board}
    assert sorted(by_trial) == [0, 1, 2] and all(r["state"] == "complete" for r in board)
    assert by_trial[0]["recipe"] == "full" and by_trial[0]["lr"] == 1e-3 and by_trial[0]["bn_adapt"] is True
    assert by_trial[1]["recipe"] == "scratch"
    for r in board:  # each trial is a real run with its own folder, history and checkpoints
        run = Path(r["run_dir"])
        assert run.parent == tmp_path / f"trial_{r['trial']:04d}" and (run / "history.json").is_file()
        assert r["best_f1"] == pytest.approx(summary(run)["best_f1"])
    assert "best: trial" in result.stdout and "python -m ocec train" in result.stdout
    assert (tmp_path / "leaderboard.csv").read_text().startswith("trial,state,recipe")

    again = _sweep(*args, "--trials", 2)
    assert again.returncode == 0, again.stderr
    board = _board(tmp_path)
    assert sorted(r["trial"] for r in board) == [0, 1, 2, 3, 4]  # the count grows, numbers are new
    defaults = [r for r in board if r["recipe"] == "full" and r["lr"] == 1e-3 and r.get("backbone_lr_ratio") == 1.0]
    assert len(defaults) == 1  # the enqueued defaults are not repeated


def test_the_best_trials_command_reproduces_its_f1(data_b, trained_run, tmp_path):
    result = _sweep("--data_root", data_b, "--pretrain", trained_run, "--output_dir", tmp_path, *SWEEP, "--trials", 2)
    assert result.returncode == 0, result.stderr
    command = result.stdout.strip().splitlines()[-1]
    assert command.startswith("python -m ocec train ")
    best = next(r for r in _board(tmp_path) if r["command"] == command)
    rerun = subprocess.run(
        [sys.executable, *shlex.split(command)[1:]], capture_output=True, text=True, env={**os.environ}, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr
    again = sorted(Path(best["run_dir"]).parent.glob("v*"))[-1]
    assert again != Path(best["run_dir"]) and summary(again)["best_f1"] == best["best_f1"]  # same seed, same machine


def test_a_killed_trial_is_marked_failed_and_the_sweep_goes_on(data_b, trained_run, tmp_path):
    proc = _start(
        "--data_root",
        data_b,
        "--pretrain",
        trained_run,
        "--output_dir",
        tmp_path,
        *SWEEP,
        "--trials",
        3,
        "--batch_size",
        4,
    )
    _wait_for(tmp_path / "trial_0000" / "v1" / "config.json")
    subprocess.run(["pkill", "-9", "-f", f"{tmp_path}/trial_0000"], check=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    states = {r["trial"]: r["state"] for r in _board(tmp_path)}
    assert states == {0: "fail", 1: "complete", 2: "complete"}
    assert "exit -9" in next(r for r in _board(tmp_path) if r["trial"] == 0)["error"]


def test_two_sweeps_sharing_a_storage_run_distinct_trials(data_b, trained_run, tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    common = ["--data_root", data_b, "--pretrain", trained_run, *SWEEP, "--storage", storage, "--study", "shared"]
    first = _start(*common, "--output_dir", tmp_path / "one", "--trials", 3)
    second = _start(*common, "--output_dir", tmp_path / "two", "--trials", 3)
    for proc in (first, second):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    import optuna

    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3, 4, 5]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert {Path(t.user_attrs["run_dir"]).parent.parent.name for t in trials} == {"one", "two"}
    drawn = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(drawn)) == len(drawn), drawn  # no parameter set twice (each process has its own sampler seed)
    defaults = [t for t in trials if t.params.get("recipe") == "full" and t.params.get("lr") == 1e-3]
    assert len(defaults) == 1  # queued once, by the process that created the study


def test_flags_the_user_fixed_are_what_every_trial_runs(data_b, trained_run, tmp_path):
    fixed = ["--recipe", "lp-ft", "--no_bn_adapt", "--lr", "1e-3"]
    result = _sweep(
        "--data_root", data_b, "--pretrain", trained_run, "--output_dir", tmp_path, *SWEEP, *fixed, "--trials", 2
    )
    assert result.returncode == 0, result.stderr
    board = _board(tmp_path)
    assert len(board) == 2 and all(r["recipe"] == "lp-ft" for r in board)  # not 'scratch', not 'full'
    for r in board:
        train = json.loads((Path(r["run_dir"]) / "config.json").read_text())["train"]
        assert train["recipe"] == "lp-ft" and train["bn_adapt"] is False and train["lr"] == 1e-3, r["command"]
        assert train["backbone_lr"] == pytest.approx(1e-3 * r["backbone_lr_ratio"], rel=1e-5)  # searched, applied


def test_a_killed_sweeps_trial_is_queued_again_and_continues_its_checkpoint(data_b, trained_run, tmp_path):
    args = ["--data_root", data_b, "--pretrain", trained_run, "--output_dir", tmp_path, *SWEEP, "--heartbeat", 1]
    proc = _start(*args, "--trials", 2, "--batch_size", 4, "--epochs", 4)
    _wait_for(tmp_path / "trial_0000" / "v1" / "ocec_epoch_0001.pt")
    proc.send_signal(signal.SIGKILL)  # its trial gets SIGTERM and saves a resumable checkpoint
    proc.wait(timeout=60)
    time.sleep(3)  # the trial's heartbeat goes stale (2 x 1 s)
    result = _sweep(*args, "--trials", 2)  # trial 1, the queued scratch default, then the retry
    assert result.returncode == 0, result.stderr
    board = {r["trial"]: r for r in _board(tmp_path)}
    assert [board[t]["state"] for t in range(3)] == ["fail", "complete", "complete"], board
    # Optuna's RetryFailedTrialCallback queued trial 0 again with its parameters; the retry continued its run
    searched = [k for k in board[0] if k not in ("trial", "state", "best_f1", "best_epoch", "seconds", "error")]
    assert {k: board[2][k] for k in searched if k not in ("command", "run_dir", "resumed")} == {
        k: board[0][k] for k in searched if k not in ("command", "run_dir", "resumed")
    }
    run = tmp_path / "trial_0000" / "v1"
    assert Path(board[2]["resumed"]).parent == run and Path(board[2]["run_dir"]) == run
    assert [r["epoch"] for r in json.loads((run / "history.json").read_text()) if r["epoch"]] == [1, 2, 3, 4]
    assert not (tmp_path / "trial_0002").exists()


def test_one_process_of_a_shared_study_claims_the_final_run(tmp_path):
    optuna = pytest.importorskip("optuna")
    from ocec.tools.sweep_study import claim_final_run

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    machines = [optuna.storages.RDBStorage(url) for _ in range(2)]  # two sweep processes, one storage
    assert [claim_final_run(optuna, store, "eyes", 7) for store in machines] == [True, False]
    assert claim_final_run(optuna, machines[1], "eyes", 9)  # a new best trial later: a new final run


@pytest.mark.parametrize(
    "text,suffix,message",
    [
        ('{"learning_rate": {"type": "float", "low": 0.1, "high": 1}}', ".json", "unknown parameter(s) learning_rate"),
        ('{"lr": {"type": "float", "low": 0.1, "high": 0.01}}', ".json", "lr: low must be below high"),
        ('{"lr": {"type": "float", "low": 0, "high": 0.01, "log": true}}', ".json", "a log range needs low > 0"),
        ('{"recipe": {"type": "categorical", "choices": ["full", "magic"]}}', ".json", "invalid choice(s) ['magic']"),
        ("lr: [unclosed", ".yaml", "not valid YAML"),
        ("{broken", ".json", "not valid JSON"),
        ("ema_decay: {type: categorical, choices: [1.5]}", ".yaml", "ema_decay: 1.5 is outside what --ema_decay"),
        ("lr: {type: float, low: -1, high: 1}", ".yaml", "lr: -1 is outside what --lr accepts, (0, inf)"),
        ("mix_ratio: {type: float, low: 0.5, high: 2}", ".yaml", "mix_ratio: 2 is outside what --mix_ratio"),
    ],
    ids=["unknown name", "empty range", "log from zero", "bad recipe", "bad yaml", "bad json", "ema", "lr", "mix"],
)
def test_a_malformed_space_file_gives_one_line(ocec, data_b, trained_run, tmp_path, text, suffix, message):
    space = tmp_path / f"space{suffix}"
    space.write_text(text)
    result = ocec("sweep", "--data_root", data_b, "--output_dir", tmp_path / "s", "--space", space, "--trials", 1)
    assert result.code == 2 and message in result.err and len(result.err.strip().splitlines()) == 1


def test_a_space_file_narrows_the_search(ocec, data_b, trained_run, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(
        "recipe: {type: categorical, choices: [lp-ft]}\nlr: {type: float, low: 0.0005, high: 0.002, log: true}\n"
    )
    result = _sweep(
        "--data_root",
        data_b,
        "--pretrain",
        trained_run,
        "--output_dir",
        tmp_path / "s",
        *SWEEP,
        "--trials",
        3,
        "--space",
        space,
    )
    assert result.returncode == 0, result.stderr
    searched = [r for r in _board(tmp_path / "s") if r["trial"] >= 0]
    assert {r["recipe"] for r in searched} == {"lp-ft"}  # the defaults' recipes are outside it: not enqueued
    assert all(5e-4 <= r["lr"] <= 2e-3 for r in searched)


def test_sweep_without_optuna_says_how_to_install(ocec, data_b, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    result = ocec("sweep", "--data_root", data_b, "--output_dir", tmp_path, "--trials", 1)
    assert result.code == 2 and "pip install 'ocec[sweep]'" in result.err


def test_the_pruner_stops_a_trial_that_reports_badly(tmp_path):
    import optuna

    from ocec.tools.sweep import Running, _follow

    class FakeProcess:
        terminated = False

        def terminate(self):
            self.terminated = True

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    trial = study.ask()
    run = tmp_path / "trial" / "v1"
    run.mkdir(parents=True)
    (run / "history.json").write_text(json.dumps([{"epoch": 1, "val_f1": 0.9}]))
    process = FakeProcess()
    follower = Running(trial, process, tmp_path / "trial", [], 0.0)
    _follow(study, follower)
    assert not process.terminated and follower.reported == 1
    (run / "history.json").write_text(json.dumps([{"epoch": 1, "val_f1": 0.9}, {"epoch": 2, "val_f1": 0.1}]))
    _follow(study, follower)
    assert process.terminated and follower.pruned
    assert re.fullmatch(r"\{1: 0\.9, 2: 0\.1\}", str(study.trials[0].intermediate_values))


def test_a_trial_takes_the_device_with_the_fewest_running_trials():
    from ocec.tools.sweep import pick_device

    devices = ["cuda:0", "cuda:1"]
    assert pick_device(devices, []) == "cuda:0" and pick_device(devices, ["cuda:0"]) == "cuda:1"
    assert pick_device(devices, ["cuda:1"]) == "cuda:0"  # trial 0 on cuda:0 ended first: its device is free
    assert pick_device(devices, ["cuda:1", "cuda:0", "cuda:1"]) == "cuda:0" and pick_device([], ["x"]) is None


def test_fixed_flags_come_last_and_a_fixed_recipe_is_never_overridden():
    from ocec.cli import build_parser
    from ocec.tools.sweep import trial_command

    fixed = {"recipe": "lp-ft", "bn_adapt": False, "lr": 1e-3}
    flags = ["--recipe", "lp-ft", "--no_bn_adapt", "--lr", "0.001"]
    params = {"backbone_lr_ratio": 0.5, "weight_decay": 1e-4}
    command = trial_command(flags, params, ["m.pt"], Path("t"), None, fixed)
    args = build_parser().parse_args(command[3:])
    assert (args.recipe, args.bn_adapt, args.lr, args.backbone_lr) == ("lp-ft", False, 1e-3, 5e-4)
    assert command.count("--recipe") == 1 and "--bn_adapt" not in command


def test_a_journal_storage_in_a_missing_folder_gives_one_line(ocec, data_b, tmp_path):
    storage = f"journal:{tmp_path}/nonexistent/x.log"
    result = ocec("sweep", "--data_root", data_b, "--output_dir", tmp_path / "s", "--storage", storage, "--trials", 1)
    assert result.code == 2 and "does not exist" in result.err and "Traceback" not in result.err


def test_a_chatty_trial_does_not_hang_the_sweep(data_b, trained_run, tmp_path, monkeypatch):
    """PYTHONVERBOSE makes every trial write megabytes to stderr: a pipe read only at the end would fill up
    (64 KB) and block the trial for ever; a file does not."""
    monkeypatch.setenv("PYTHONVERBOSE", "1")
    args = ["--data_root", data_b, "--pretrain", trained_run, "--output_dir", tmp_path, *SWEEP, "--trials", 1]
    result = _sweep(*args, "--epochs", 1)
    assert result.returncode == 0, result.stderr[-500:]
    assert _board(tmp_path)[0]["state"] == "complete"
    assert (tmp_path / "trial_0000" / "stderr.log").stat().st_size > 200_000
