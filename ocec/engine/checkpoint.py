"""Checkpoint files: atomic saving, safe loading, keeping the best/last N, and the training payload.

Every checkpoint is a dict of tensors and plain Python types, written atomically and read with
`torch.load(..., weights_only=True)`: a file that would need to run code to unpickle is refused.
Reading weights to start *from* (`--pretrain`, eval, export) is in `pretrained.py`.
"""

from __future__ import annotations

import logging
import pickle
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core.config import ModelConfig, TrainConfig, upgrade_model_config
from ..core.errors import UserError
from ..core.fileio import atomic_write, to_jsonable
from ..core.metrics import is_defined
from ..core.version import __version__

log = logging.getLogger("ocec")

FORMAT_VERSION = 2  # 2: architectures named as upstream's (format 1 files are upgraded when read)
READABLE_FORMATS = (1, 2)
EPOCH_RE = re.compile(r"^ocec_epoch_(\d{4,})\.pt$")
BEST_RE = re.compile(r"^ocec_best_epoch(\d{4,})_(f1|loss)_(\d+\.\d+)\.pt$")
INTERRUPTED_NAME = "ocec_interrupted.pt"


def epoch_name(epoch: int) -> str:
    return f"ocec_epoch_{epoch:04d}.pt"


def best_name(epoch: int, value: float, metric: str = "f1") -> str:
    return f"ocec_best_epoch{epoch:04d}_{metric}_{value:.4f}.pt"


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_file(path: str | Path, flag: str = "--pretrain") -> dict:
    """Load a .pt/.pth file safely, or raise a UserError naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # torch.save zip, or a legacy pickle
        raise UserError(f"{flag} {path}: not a PyTorch checkpoint (neither a torch.save zip nor a pickle)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "global" in text.lower():
            detail = next((ln.strip() for ln in text.splitlines() if "unsupported global" in ln.lower()), "")
            raise UserError(
                f"{flag} {path}: refused: the file holds Python objects that could run code when "
                f"loaded ({detail[:160]}); only tensors and plain data are accepted"
            ) from None
        raise UserError(f"{flag} {path}: not a readable checkpoint ({first_sentence(text)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as exc:
        raise UserError(
            f"{flag} {path}: not a readable PyTorch checkpoint, truncated or damaged "
            f"({first_sentence(str(exc)) or type(exc).__name__})"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{flag} {path}: not an ocec checkpoint (holds a {type(data).__name__}, not a dict)")
    if data.get("ocec_format") in READABLE_FORMATS and isinstance(data.get("model_config"), dict):
        data["model_config"] = upgrade_model_config(data["model_config"], data["ocec_format"])
        data["ocec_format"] = FORMAT_VERSION
    return data


def first_sentence(text: str) -> str:
    return text.strip().splitlines()[0].split(". ")[0][:160] if text.strip() else ""


def is_training_checkpoint(data: dict) -> bool:
    return data.get("ocec_format") == FORMAT_VERSION and "model_state" in data and "model_config" in data


# --- resuming ---------------------------------------------------------------------------------------


def latest_resumable(run_dir: Path) -> Path:
    """The newest complete epoch checkpoint of a run folder, or its interrupt checkpoint if newer."""
    epochs = sorted((int(m.group(1)), p) for p in run_dir.iterdir() if (m := EPOCH_RE.match(p.name)))
    interrupted = run_dir / INTERRUPTED_NAME
    if interrupted.is_file():
        data = load_file(interrupted, "--resume")
        if not epochs or data.get("epoch", 0) > epochs[-1][0]:
            return interrupted
    if not epochs:
        raise UserError(f"--resume {run_dir}: the folder holds no ocec_epoch_XXXX.pt checkpoint")
    return epochs[-1][1]


def load_resumable(path: str | Path) -> tuple[Path, dict]:
    """(checkpoint path, its contents) for --resume given a checkpoint file or a run folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = latest_resumable(path)
    raw = load_file(path, "--resume")
    if not is_training_checkpoint(raw):
        raise UserError(
            f"--resume {path}: not an ocec training checkpoint (use --pretrain to start from foreign weights)"
        )
    return path, raw


# --- keeping the best / last N ----------------------------------------------------------------------


@dataclass
class Best:
    """The best epoch so far by the selection metric (F1: higher is better; loss: lower)."""

    metric: str = "val_f1"  # val_f1, train_f1 or val_loss
    score: float | None = None
    f1: float | None = None  # F1 at that epoch (also when selecting on loss)
    epoch: int | None = None
    path: str | None = None
    tiebreak: float | None = None  # F1 at the best threshold: decides while F1 at 0.5 is 0 in every epoch

    def improved_by(self, score: float | None, tiebreak: float | None = None) -> bool:
        """Higher F1 (lower loss) wins. While every epoch so far has F1 0 at the 0.5 threshold (a model that
        calls everything 'closed', as early epochs can), the best-threshold F1 decides among them: crowning
        the first all-one-class epoch would keep a worse model than the next one."""
        if not is_defined(score):
            return False
        if self.score is None:
            return True
        if self.metric.endswith("loss"):
            return score < self.score
        if score == self.score == 0 and is_defined(tiebreak):
            return not is_defined(self.tiebreak) or tiebreak > self.tiebreak
        return score > self.score

    def after(self, epoch: int, score, f1, tiebreak, run_dir: Path) -> "Best | None":
        """The new best if this epoch improves on it (its checkpoint named after the metric), else None."""
        if not self.improved_by(score, tiebreak):
            return None
        name = best_name(epoch, f1) if self.metric.endswith("f1") else best_name(epoch, score, "loss")
        return Best(self.metric, float(score), f1, epoch, str(Path(run_dir) / name), tiebreak)

    def by_tiebreak(self) -> bool:
        """Chosen by the best-threshold F1 (no epoch has had F1 > 0 at 0.5 yet)."""
        return self.score == 0 and not self.metric.endswith("loss") and is_defined(self.tiebreak)

    def to_dict(self) -> dict:
        return to_jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict | None) -> "Best":
        data = dict(data or {})
        data.setdefault("score", data.get("f1"))  # written before `score` was recorded
        return cls(**data)


@dataclass
class RunRecord:
    """What a run has achieved so far; every checkpoint holds it, so a resumed run continues it."""

    history: list[dict]
    best: Best
    pretrain: dict | None = None  # the --pretrain load report

    def to_dict(self) -> dict:
        return {"history": list(self.history), "best": self.best.to_dict(), "pretrain": self.pretrain}

    @classmethod
    def from_dict(cls, raw: dict) -> "RunRecord":
        return cls(list(raw.get("history") or []), Best.from_dict(raw.get("best")), raw.get("pretrain"))


class CheckpointKeeper:
    """Writes the epoch and best checkpoints of one run folder and prunes the oldest beyond the limits."""

    def __init__(self, run_dir: Path, keep_last: int, keep_best: int):
        self.run_dir, self.keep_last, self.keep_best = run_dir, keep_last, keep_best

    def _files(self, pattern: re.Pattern) -> list[tuple[int, Path]]:
        return sorted((int(m.group(1)), p) for p in self.run_dir.iterdir() if (m := pattern.match(p.name)))

    def save_epoch(self, epoch: int, payload: dict) -> Path:
        path = save_checkpoint(self.run_dir / epoch_name(epoch), payload)
        self._prune(EPOCH_RE, self.keep_last)
        return path

    def save_best(self, name: str, payload: dict) -> Path:
        """A best checkpoint that has no epoch file (the --pretrain start, epoch 0)."""
        path = save_checkpoint(self.run_dir / name, payload)
        self._prune(BEST_RE, self.keep_best)
        return path

    def copy_to_best(self, source: Path, name: str) -> Path:
        """The best checkpoint is a copy of an epoch checkpoint: serialised once, copied atomically."""
        epoch = int(BEST_RE.match(name).group(1))
        for _, old in [(e, p) for e, p in self._files(BEST_RE) if e == epoch]:
            old.unlink()  # same epoch re-run after a resume: replace, do not duplicate
        with source.open("rb") as src:
            path = atomic_write(self.run_dir / name, lambda dst: shutil.copyfileobj(src, dst))
        self._prune(BEST_RE, self.keep_best)
        return path

    def _prune(self, pattern: re.Pattern, keep: int) -> None:
        files = self._files(pattern)
        for _, path in files[: max(0, len(files) - keep)]:
            path.unlink(missing_ok=True)

    def drop_after(self, epoch: int) -> list[Path]:
        """On resume from `epoch`, remove checkpoints of later epochs: the resumed run rewrites them."""
        stale = [p for pattern in (EPOCH_RE, BEST_RE) for e, p in self._files(pattern) if e > epoch]
        for path in stale:
            path.unlink(missing_ok=True)
        return stale


# --- what a training checkpoint holds ---------------------------------------------------------------


def training_payload(
    *,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    states: dict,
    record: dict,
    epoch: int,
    step: int = 0,
    metrics: dict | None = None,
    score: float | None = None,
    threshold: float | None = None,
    extra: dict | None = None,
) -> dict:
    """A complete training checkpoint: `states` are the state dicts of model, optimizer, schedule and
    scaler (`Learner.state_dict()`), `record` the run's history, best epoch and pretrain record
    (`RunRecord.to_dict()`)."""
    return {
        "ocec_format": FORMAT_VERSION,
        "ocec_version": __version__,
        "model_config": model_cfg.to_dict(),
        "train_config": train_cfg.to_dict(),
        "normalization": {
            "mean": list(model_cfg.mean),
            "std": list(model_cfg.std),
            "image_size": list(model_cfg.image_size),
        },
        "label_map": {0: "closed", 1: "open"},
        "epoch": epoch,
        "step": step,
        **states,
        "metrics": to_jsonable(metrics or {}),
        "score": score,
        "threshold": threshold,  # the val split's F1-optimal probability threshold (--threshold auto)
        **record,
        **(extra or {}),
    }
