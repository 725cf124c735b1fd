"""Checkpoints: atomic saving, safe loading, keeping the best/last N, and pretrained loading.

Every checkpoint is a dict of tensors and plain Python types, written atomically and read
with `torch.load(..., weights_only=True)`: a file that would need to run code to unpickle is
refused. Three kinds of file are understood and normalised to a `Snapshot`:
  - our own `.pt` checkpoints (they carry `ocec_format`),
  - checkpoints of the upstream OCEC trainer (converted by `upstream.py`),
  - `.safetensors` weights written by `ocec export --format safetensors`.
"""

from __future__ import annotations

import glob
import json
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import UserError
from .fileio import TMP_PREFIX, atomic_write
from .metrics import is_defined
from .model import OcecModel, parameter_group_of
from .upstream import convert_upstream, is_upstream_checkpoint

log = logging.getLogger("ocec")

FORMAT_VERSION = 1
EPOCH_RE = re.compile(r"^ocec_epoch_(\d{4,})\.pt$")
BEST_RE = re.compile(r"^ocec_best_epoch(\d{4,})_f1_(\d+\.\d+)\.pt$")
INTERRUPTED_NAME = "ocec_interrupted.pt"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")


def epoch_name(epoch: int) -> str:
    return f"ocec_epoch_{epoch:04d}.pt"


def best_name(epoch: int, f1: float) -> str:
    return f"ocec_best_epoch{epoch:04d}_f1_{f1:.4f}.pt"


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    return atomic_write(path, lambda f: torch.save(payload, f))


# --- loading ------------------------------------------------------------------------------------


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
        raise UserError(f"{flag} {path}: not a readable checkpoint ({_first_sentence(text)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as exc:
        raise UserError(
            f"{flag} {path}: not a readable PyTorch checkpoint, truncated or damaged "
            f"({_first_sentence(str(exc)) or type(exc).__name__})"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{flag} {path}: not an ocec checkpoint (holds a {type(data).__name__}, not a dict)")
    return data


def _first_sentence(text: str) -> str:
    return text.strip().splitlines()[0].split(". ")[0][:160] if text.strip() else ""


@dataclass
class Snapshot:
    """Model weights with what is needed to rebuild and judge them."""

    path: Path
    model_config: ModelConfig
    state: dict
    metrics: dict = field(default_factory=dict)
    epoch: int | None = None
    origin: str = "ocec"
    raw: dict | None = None  # the full checkpoint, for --resume

    @property
    def score(self) -> float | None:
        """The F1 this checkpoint was selected by (validation F1, else training F1), if known."""
        if self.raw and is_defined(self.raw.get("score")):
            return float(self.raw["score"])
        if is_defined(self.metrics.get("f1")):
            return float(self.metrics["f1"])
        match = BEST_RE.match(self.path.name)
        return float(match.group(2)) if match else None


def read_snapshot(path: str | Path, flag: str = "--pretrain") -> Snapshot:
    path = Path(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path, flag)
    data = load_file(path, flag)
    if is_upstream_checkpoint(data):
        cfg, state, metrics = convert_upstream(data, f"{flag} {path}")
        return Snapshot(path, cfg, state, metrics, data.get("epoch"), "upstream")
    if data.get("ocec_format") != FORMAT_VERSION or "model_state" not in data or "model_config" not in data:
        raise UserError(f"{flag} {path}: not an ocec checkpoint (no model_state/model_config)")
    try:
        cfg = ModelConfig.from_dict(data["model_config"]).validate()
    except (TypeError, ValueError, UserError) as exc:
        raise UserError(f"{flag} {path}: the checkpoint's model_config is invalid ({exc})") from None
    metrics = dict((data.get("metrics") or {}).get("val") or {})
    return Snapshot(path, cfg, data["model_state"], metrics, data.get("epoch"), "ocec", data)


def _read_safetensors(path: Path, flag: str) -> Snapshot:
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise UserError(
            f"{flag} {path}: reading .safetensors needs the safetensors package (pip install 'ocec[safetensors]')"
        ) from None
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            state = {k: handle.get_tensor(k) for k in handle.keys()}
        cfg = ModelConfig.from_dict(json.loads(meta["ocec_model_config"])).validate()
        metrics = json.loads(meta.get("ocec_metrics", "{}"))
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, UserError) as exc:
        raise UserError(f"{flag} {path}: not an ocec safetensors file ({str(exc).splitlines()[0][:160]})") from None
    return Snapshot(path, cfg, state, metrics, None, "safetensors")


# --- choosing among candidates ----------------------------------------------------------------------


def expand_candidates(paths: list[str], flag: str = "--pretrain") -> list[Path]:
    """Files, folders (their checkpoint files) and quoted globs -> checkpoint paths."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            inside = sorted(
                p
                for p in path.iterdir()
                if p.suffix in CHECKPOINT_SUFFIXES and p.is_file() and not p.name.startswith(TMP_PREFIX)
            )
            if not inside:
                raise UserError(f"{flag} {path}: the folder holds no checkpoint (.pt/.pth/.safetensors) files")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(raw):
            matches = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
            if not matches:
                raise UserError(f"{flag} {raw}: the pattern matches no file")
            found.extend(matches)
        else:
            raise UserError(f"{flag} {path}: no such file or directory")
    return list(dict.fromkeys(found))


def choose_best(paths: list[str], flag: str = "--pretrain") -> tuple[Snapshot, str]:
    """The candidate with the highest selection F1 (ties: later epoch), and a sentence saying why."""
    candidates = expand_candidates(paths, flag)
    if len(candidates) == 1:
        snap = read_snapshot(candidates[0], flag)
        return snap, f"{snap.path} (the only candidate)"
    snaps = [read_snapshot(p, flag) for p in candidates]
    scored = [s for s in snaps if s.score is not None]
    if not scored:
        snap = max(snaps, key=lambda s: (s.epoch or -1, str(s.path)))
        return snap, f"{snap.path} (no candidate records an F1; latest epoch of {len(snaps)})"
    # Ties (a best file and the epoch file of the same epoch): prefer the later epoch, then the best-named file.
    snap = max(scored, key=lambda s: (s.score, s.epoch or -1, bool(BEST_RE.match(s.path.name)), str(s.path)))
    return snap, f"{snap.path} (highest F1 {snap.score:.4f} among {len(snaps)} candidates)"


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


# --- keeping the best / last N ----------------------------------------------------------------------


class CheckpointKeeper:
    """Writes epoch and best checkpoints of one run folder and prunes the oldest beyond the limits."""

    def __init__(self, run_dir: Path, keep_last: int, keep_best: int):
        self.run_dir, self.keep_last, self.keep_best = run_dir, keep_last, keep_best

    def _files(self, pattern: re.Pattern) -> list[tuple[int, Path]]:
        return sorted((int(m.group(1)), p) for p in self.run_dir.iterdir() if (m := pattern.match(p.name)))

    def save_epoch(self, epoch: int, payload: dict) -> Path:
        path = save_checkpoint(self.run_dir / epoch_name(epoch), payload)
        self._prune(EPOCH_RE, self.keep_last)
        return path

    def save_best(self, epoch: int, f1: float, payload: dict) -> Path:
        for _, old in [(e, p) for e, p in self._files(BEST_RE) if e == epoch]:
            old.unlink()  # same epoch re-run after a resume: replace, do not duplicate
        path = save_checkpoint(self.run_dir / best_name(epoch, f1), payload)
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


# --- pretrained weights into a model ---------------------------------------------------------------


@dataclass
class LoadReport:
    loaded: dict[str, int]
    reinitialised: dict[str, int]
    ignored: list[str]
    notes: list[str]

    def line(self) -> str:
        loaded = ", ".join(f"{g} {n}" for g, n in self.loaded.items())
        reinit = ", ".join(f"{g} {n}" for g, n in self.reinitialised.items() if n) or "none"
        ignored = f"{len(self.ignored)}" + (f" ({', '.join(self.ignored[:4])})" if self.ignored else "")
        text = f"pretrained tensors loaded: {loaded}; re-initialised: {reinit}; ignored: {ignored}"
        return text + "".join(f"; {note}" for note in self.notes)


def load_pretrained(
    model: OcecModel, snap: Snapshot, reinit_head: bool = False, margin_init: str = "auto"
) -> LoadReport:
    """Copy `snap`'s weights into `model`, re-initialising the margin head when the margin method
    changed (and the head with `reinit_head`). Anything else missing, extra or mis-shaped is an
    error listing every offender: never a silent partial load."""
    target = model.state_dict()
    old_method, new_method = snap.model_config.margin_method, model.config.margin_method
    fresh = set()
    notes = []
    if old_method != new_method:
        fresh.add("margin_head")
        notes.append(f"margin method {old_method} -> {new_method}: margin head re-initialised")
    if reinit_head:  # a new head invalidates the margin head that read its embedding
        fresh |= {"head", "margin_head"}
        notes.append("--reinit_head: head and margin head re-initialised")
    keep = {k: v for k, v in snap.state.items() if parameter_group_of(k) not in fresh}
    ignored = sorted(k for k in snap.state if parameter_group_of(k) in fresh)
    problems = []
    for name, tensor in keep.items():
        if name not in target:
            problems.append(f"{name}: checkpoint={tuple(tensor.shape)}, given=absent")
        elif tuple(tensor.shape) != tuple(target[name].shape):
            problems.append(f"{name}: checkpoint={tuple(tensor.shape)}, given={tuple(target[name].shape)}")
    for name in target:
        if parameter_group_of(name) not in fresh and name not in keep:
            problems.append(f"{name}: checkpoint=absent, given={tuple(target[name].shape)}")
    if problems:
        raise UserError(
            f"--pretrain {snap.path}: the weights do not fit the model: "
            + "; ".join(problems[:8])
            + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else "")
        )
    result = model.load_state_dict(keep, strict=False)
    assert not result.unexpected_keys and {parameter_group_of(k) for k in result.missing_keys} <= fresh, result

    linear = snap.state.get("margin_head.fc.weight")
    wants_linear = "head" not in fresh and (
        margin_init == "from_linear" or (margin_init == "auto" and linear is not None)
    )
    if "margin_head" in fresh and new_method != "none" and wants_linear:
        if linear is None:
            raise UserError(f"--margin_init from_linear: {snap.path} has no linear classifier to start from")
        model.margin_head.init_from_linear(linear)
        notes.append("new margin head starts from the old classifier's direction")
    counts = {g: 0 for g in ("backbone", "head", "margin_head")}
    for name in keep:
        counts[parameter_group_of(name)] += 1
    reinit = {g: sum(1 for k in target if parameter_group_of(k) == g) for g in sorted(fresh)}
    return LoadReport(counts, reinit, ignored, notes)
