"""The Optuna study of `ocec sweep`: its storage (SQLite by default, any RDB or a journal file shared by
several machines), the sampler each process seeds for itself, the default trials queued once, the retry of
trials a killed sweep left, and the claim that makes one process of a shared study run the final training."""

from __future__ import annotations

import logging
import os
import socket
import time
import zlib
from pathlib import Path

from ..core.errors import UserError
from ..engine.checkpoint import latest_resumable
from ..engine.rundir import latest_run_dir
from .sweep_space import default_trials

log = logging.getLogger("ocec")


def open_study(optuna, folder: Path, storage: str | None, name: str, pruner: str, seed: int, heartbeat: int):
    url = storage or f"sqlite:///{(folder / 'sweep.db').resolve()}"
    if url.startswith(("sqlite:", "postgresql", "mysql")):
        for attempt in range(5):  # sweeps started together race to create a new database's tables
            try:
                store = optuna.storages.RDBStorage(
                    url,
                    engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else None,
                    heartbeat_interval=heartbeat or None,
                    grace_period=2 * heartbeat if heartbeat else None,
                    # a trial of a killed sweep is queued again with its parameters (and continues its
                    # checkpoint, see resumable_retry); twice at most
                    failed_trial_callback=optuna.storages.RetryFailedTrialCallback(
                        max_retry=2, inherit_intermediate_values=True
                    )
                    if heartbeat
                    else None,
                )
                break
            except Exception as exc:  # noqa: BLE001 - sqlalchemy's errors, or a URL that does not connect
                racing = "already exists" in str(exc) or type(exc).__name__ == "IntegrityError"  # tables / version row
                if attempt == 4 or not racing:
                    raise UserError(f"--storage {url}: cannot open it ({str(exc).splitlines()[0][:200]})") from None
                time.sleep(0.5 + attempt)
    elif url.startswith("journal:"):  # a journal file on a shared filesystem: journal:/shared/sweep.log
        journal = Path(url[len("journal:") :]).expanduser()
        if not journal.parent.is_dir():
            raise UserError(f"--storage {url}: the folder {journal.parent} does not exist")
        try:
            store = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        except OSError as exc:
            raise UserError(f"--storage {url}: cannot open it ({exc.strerror or exc})") from None
    else:
        raise UserError(f"--storage {url}: expected sqlite:///PATH, postgresql://..., mysql://... or journal:PATH")
    pruners = {
        "median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
        "hyperband": optuna.pruners.HyperbandPruner(min_resource=1),
        "none": optuna.pruners.NopPruner(),
    }
    # Each process gets its own sampler seed (--seed mixed with host and pid): processes sharing a study, and
    # reruns that continue it, draw new parameters instead of repeating each other's (Optuna's advice for
    # parallel workers); constant_liar makes TPE treat running trials as taken. Every trial's command is
    # recorded, so each trial reproduces; the order of draws across processes does not.
    salt = zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())
    sampler = optuna.samplers.TPESampler(seed=(seed * 1_000_003 + salt) % 2**32, constant_liar=True)
    settings = dict(study_name=name, storage=store, sampler=sampler, pruner=pruners[pruner])
    try:
        try:  # exactly one process creates a study (the storage refuses a second): that one queues the defaults
            study, created = optuna.create_study(direction="maximize", **settings), True
        except optuna.exceptions.DuplicatedStudyError:
            study, created = optuna.load_study(**settings), False
    except Exception as exc:  # noqa: BLE001 - a storage URL that does not connect is the user's to fix
        raise UserError(f"--storage {url}: cannot open the study ({str(exc).splitlines()[0][:200]})") from None
    if heartbeat and hasattr(store, "record_heartbeat"):  # trials of a sweep that was killed: failed, not counted
        fail = (optuna.trial.TrialState.FAIL,)
        before = len(study.get_trials(deepcopy=False, states=fail))
        optuna.storages.fail_stale_trials(study)
        if len(study.get_trials(deepcopy=False, states=fail)) > before:
            log.warning("sweep: trial(s) of a stopped sweep marked failed and queued again, to continue")
    return study, store, created


def resumable_retry(optuna, study, trial, folder: Path) -> Path | None:
    """The checkpoint to continue when `trial` re-runs a trial of a killed sweep (Optuna's
    RetryFailedTrialCallback queued it with the same parameters), or None: a new trial, or a killed one that
    had saved nothing yet (it then starts over in its own folder)."""
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    original = optuna.storages.RetryFailedTrialCallback.retried_trial_number(frozen)
    if original is None:
        return None
    run = latest_run_dir(folder / f"trial_{original:04d}")
    try:
        return latest_resumable(run) if run else None
    except UserError:  # the folder holds no checkpoint yet
        return None


def claim_final_run(optuna, store, study_name: str, best_trial: int) -> bool:
    """Whether this process runs the final training of the best trial: sweep processes on several machines
    that share the study each end with the same best, and one final run is enough. The claim is a study
    named '<study>:final:<trial>' in the shared storage, which exactly one process can create (the same
    guarantee that makes one process the study's creator); a later best trial is a new claim."""
    try:
        optuna.create_study(study_name=f"{study_name}:final:{best_trial}", storage=store)
    except optuna.exceptions.DuplicatedStudyError:
        return False
    return True


def enqueue_defaults(study, space: dict, pretrain: list[str]) -> None:
    """The defaults go first, once per study (called by the process that created it)."""
    for params in default_trials(space, pretrain):
        study.enqueue_trial(params, skip_if_exists=True)
