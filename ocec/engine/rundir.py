"""The run folder: creating it, its log file, and the history and summary written after every epoch."""

from __future__ import annotations

import csv
import io
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from ..core.errors import UserError
from ..core.fileio import write_json_atomic, write_text_atomic
from ..core.metrics import is_defined
from .checkpoint import EPOCH_RE

log = logging.getLogger("ocec")


def check_writable(folder: str | Path, flag: str = "--output_dir", created: list | None = None) -> Path:
    """Fail before any work if the output folder cannot be created or written. Folders this creates
    are appended to `created`, so a run that fails before writing anything can remove them again."""
    folder = Path(folder).expanduser()
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".ocec-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{flag} {folder}: cannot write there ({exc.strerror or exc})") from None
    if created is not None:
        created.extend(missing)  # deepest first
    return folder


@contextmanager
def removed_if_left_empty():
    """Yields a list for the folders a job creates; if the job fails, those still empty are removed
    (deepest first), so a failed command leaves no new, empty output folder behind."""
    created: list[Path] = []
    try:
        yield created
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # not empty (a run started there), or already gone
                break
        raise


def latest_run_dir(output_dir: Path) -> Path | None:
    """The highest-numbered <output_dir>/vN (v10 after v9), or None."""
    runs = [p for p in Path(output_dir).glob("v*") if p.name[1:].isdigit() and p.is_dir()]
    return max(runs, key=lambda p: int(p.name[1:]), default=None)


def next_run_dir(output_dir: Path, created: list | None = None) -> Path:
    """Create and return the next free <output_dir>/vN (never an existing one)."""
    while True:
        taken = [int(p.name[1:]) for p in output_dir.glob("v*") if p.name[1:].isdigit()]
        candidate = output_dir / f"v{max(taken, default=0) + 1}"
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        if created is not None:
            created.insert(0, candidate)
        return candidate


class _Buffer(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@contextmanager
def run_log():
    """Keeps log records until the run folder exists, so train.log tells the whole story.
    Yields `attach(run_dir)`, which writes what was kept to <run>/train.log and logs there from then on."""
    buffer, files = _Buffer(), []
    log.addHandler(buffer)

    def attach(run_dir: Path) -> None:
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        for record in buffer.records:
            handler.handle(record)
        log.removeHandler(buffer)
        log.addHandler(handler)
        files.append(handler)

    try:
        yield attach
    finally:
        for handler in [buffer, *files]:
            log.removeHandler(handler)
            handler.close()


def write_history(run_dir: Path, history: list[dict]) -> None:
    write_json_atomic(run_dir / "history.json", history)
    columns = list(dict.fromkeys(k for row in history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(run_dir / "history.csv", buffer.getvalue())


def write_summary(run_dir: Path, history: list[dict], best: dict, *, epochs: int, pretrain, device) -> None:
    last = history[-1] if history else {}
    rates = [r["images_per_s"] for r in history if r.get("images_per_s")]
    epoch_files = sorted(p for p in run_dir.iterdir() if EPOCH_RE.match(p.name))
    write_json_atomic(
        run_dir / "summary.json",
        {
            "run_dir": str(run_dir),
            "best_epoch": best["epoch"],
            "best_f1": best["f1"],
            "best_checkpoint": best["path"],
            "selection": best["metric"],
            "best_score": best["score"],
            "last_epoch": last.get("epoch"),
            "last_checkpoint": str(epoch_files[-1]) if epoch_files else None,
            "final_val_f1": last.get("val_f1"),
            "final_train_f1": last.get("train_f1"),
            "best_val_fisher": max((r["val_fisher"] for r in history if is_defined(r.get("val_fisher"))), default=None),
            "epochs": epochs,
            "epochs_completed": sum(1 for r in history if r["epoch"] > 0),  # epoch 0: the --pretrain start
            "train_seconds": round(sum(r.get("seconds") or 0 for r in history), 2),
            "wall_seconds": round(sum(r.get("wall_seconds") or 0 for r in history), 2),
            "images_per_s": round(sum(rates) / len(rates), 1) if rates else None,
            "pretrain": pretrain,
            "device": str(device),
        },
    )
