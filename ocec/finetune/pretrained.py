"""Weights to start from or to judge: `--pretrain`, `eval`, `compare`, `predict`, `export`.

Three kinds of file are understood and normalised to a `Snapshot`:
  - our own `.pt` checkpoints (they carry `ocec_format`),
  - checkpoints of the upstream OCEC trainer (converted by `upstream.py`),
  - `.safetensors` weights written by `ocec export --format safetensors`.
Loading into a model never happens partially: every missing, extra or mis-shaped tensor is listed.
"""

from __future__ import annotations

import glob
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..core.config import ModelConfig, upgrade_model_config
from ..core.errors import UserError
from ..core.fileio import TMP_PREFIX, to_jsonable
from ..core.metrics import is_defined
from ..engine.checkpoint import BEST_RE, is_training_checkpoint, load_file
from ..models.model import OcecModel, build_model, parameter_group_of
from ..models.upstream import convert_upstream, is_upstream_checkpoint

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")


@dataclass
class Snapshot:
    """Model weights with what is needed to rebuild and judge them."""

    path: Path
    model_config: ModelConfig
    state: dict
    metrics: dict = field(default_factory=dict)  # validation metrics recorded with the weights
    epoch: int | None = None
    origin: str = "ocec"  # ocec, upstream or safetensors
    score: float | None = None  # the F1 the weights were selected by (val F1, else train F1), if known
    train_config: dict = field(default_factory=dict)  # of the run that wrote them (ocec checkpoints)
    history: list = field(default_factory=list)
    pretrain: dict | None = None  # what that run started from
    threshold: float | None = None  # the F1-optimal probability threshold on that run's val split
    label_map: dict | None = None  # {0: 'closed', 1: 'open'} as the checkpoint records it


def read_snapshot(path: str | Path, flag: str = "--pretrain") -> Snapshot:
    path = Path(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path, flag)
    data = load_file(path, flag)
    if is_upstream_checkpoint(data):
        cfg, state, metrics = convert_upstream(data, f"{flag} {path}")
        snap = Snapshot(path, cfg, state, metrics, data.get("epoch"), "upstream", _score(metrics, path))
        snap.label_map = data.get("label_map")
        return snap
    if not is_training_checkpoint(data):
        raise UserError(f"{flag} {path}: not an ocec checkpoint (no model_state/model_config)")
    try:
        cfg = ModelConfig.from_dict(data["model_config"]).validate()
    except (TypeError, ValueError, UserError) as exc:
        raise UserError(f"{flag} {path}: the checkpoint's model_config is invalid ({exc})") from None
    metrics = dict((data.get("metrics") or {}).get("val") or {})
    score = float(data["score"]) if is_defined(data.get("score")) else _score(metrics, path)
    return Snapshot(
        path,
        cfg,
        data.get("ema_state") or data["model_state"],  # with --ema_decay, the averaged weights were the ones kept
        metrics,
        data.get("epoch"),
        "ocec",
        score,
        dict(data.get("train_config") or {}),
        list(data.get("history") or []),
        data.get("pretrain"),
        data.get("threshold") if is_defined(data.get("threshold")) else None,
        data.get("label_map"),
    )


def _score(metrics: dict, path: Path) -> float | None:
    if is_defined(metrics.get("f1")):
        return float(metrics["f1"])
    match = BEST_RE.match(path.name)
    return float(match.group(3)) if match and match.group(2) == "f1" else None


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
        written = json.loads(meta["ocec_model_config"])
        cfg = ModelConfig.from_dict(upgrade_model_config(written, int(meta.get("ocec_format", 1)))).validate()
        metrics = json.loads(meta.get("ocec_metrics", "{}"))
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, UserError) as exc:
        raise UserError(f"{flag} {path}: not an ocec safetensors file ({str(exc).splitlines()[0][:160]})") from None
    return Snapshot(path, cfg, state, metrics, None, "safetensors", _score(metrics, path))


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


def resolve_threshold(value, snap: Snapshot) -> float:
    """--threshold: a probability, or 'auto' for the one stored with the checkpoint."""
    if value != "auto":
        return float(value)
    if snap.threshold is None:
        raise UserError(
            f"--threshold auto: {snap.path} records no threshold (it is stored by runs with a val split); give a number"
        )
    return snap.threshold


def choose_best(paths: list[str], flag: str = "--pretrain") -> tuple[Snapshot, str]:
    """The candidate with the highest selection F1 (ties: a run's best-named file, then the later epoch), and
    a sentence saying why."""
    candidates = expand_candidates(paths, flag)
    if len(candidates) == 1:
        snap = read_snapshot(candidates[0], flag)
        return snap, f"{snap.path} (the only candidate)"
    snaps = [read_snapshot(p, flag) for p in candidates]
    scored = [s for s in snaps if s.score is not None]
    if not scored:
        snap = max(snaps, key=lambda s: (s.epoch or -1, str(s.path)))
        return snap, f"{snap.path} (no candidate records an F1; latest epoch of {len(snaps)})"
    # Ties: the run's own best file first (a later epoch that only equalled it is not what the run chose, and
    # its stored threshold differs: `eval --threshold auto` of a run must use the best file's), then the later epoch.
    snap = max(scored, key=lambda s: (s.score, bool(BEST_RE.match(s.path.name)), s.epoch or -1, str(s.path)))
    return snap, f"{snap.path} (highest F1 {snap.score:.4f} among {len(snaps)} candidates)"


# --- weights into a model -----------------------------------------------------------------------------


def state_mismatches(target: dict, source: dict, skip_groups: set = frozenset()) -> list[str]:
    """Every tensor that is missing, extra or shaped differently between two state dicts."""
    problems = []
    for name, tensor in source.items():
        if parameter_group_of(name) in skip_groups:
            continue
        if name not in target:
            problems.append(f"{name}: checkpoint={tuple(tensor.shape)}, given=absent")
        elif tuple(tensor.shape) != tuple(target[name].shape):
            problems.append(f"{name}: checkpoint={tuple(tensor.shape)}, given={tuple(target[name].shape)}")
    for name in target:
        if parameter_group_of(name) not in skip_groups and name not in source:
            problems.append(f"{name}: checkpoint=absent, given={tuple(target[name].shape)}")
    return problems


def _refuse(where: str, what: str, problems: list[str]) -> None:
    if problems:
        more = f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""
        raise UserError(f"{where}: {what}: " + "; ".join(problems[:8]) + more)


def load_for_inference(
    paths: list[str], device: torch.device, flag: str = "--checkpoint"
) -> tuple[OcecModel, Snapshot, str]:
    """The best of the given checkpoints as an eval-mode model on `device`, and why it was chosen."""
    snap, why = choose_best(paths, flag)
    model = build_model(snap.model_config)
    load_pretrained_state(model, snap, flag)
    return model.to(device).eval(), snap, why


def load_pretrained_state(model: OcecModel, snap: Snapshot, flag: str = "--teacher") -> None:
    """All of a snapshot's weights into a model of its recorded architecture (one line if they differ)."""
    _refuse(
        f"{flag} {snap.path}",
        "the weights do not match the recorded architecture",
        state_mismatches(model.state_dict(), snap.state),
    )
    model.load_state_dict(snap.state)


@dataclass
class LoadReport:
    """What `--pretrain` loaded: stored in config.json, every checkpoint and summary.json."""

    path: str
    origin: str
    f1: float | None
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

    def to_dict(self) -> dict:
        return to_jsonable(asdict(self))


def load_pretrained(
    model: OcecModel, snap: Snapshot, reinit_head: bool = False, margin_init: str = "auto"
) -> LoadReport:
    """Copy `snap`'s weights into `model`, re-initialising the margin head when the margin method
    changed (and the head with `reinit_head`). Anything else missing, extra or mis-shaped is an
    error listing every offender: never a silent partial load."""
    old_method, new_method = snap.model_config.margin_method, model.config.margin_method
    fresh, notes = set(), []
    if old_method != new_method:
        fresh.add("margin_head")
        notes.append(f"margin method {old_method} -> {new_method}: margin head re-initialised")
    if reinit_head:  # a new head invalidates the margin head that read its embedding
        fresh |= {"head", "margin_head"}
        notes.append("--reinit_head: head and margin head re-initialised")
    if margin_init != "auto" and "margin_head" not in fresh:
        raise UserError(
            f"--margin_init {margin_init}: the margin head is kept from {snap.path} (same --margin_method "
            f"{new_method}); it applies only when the margin head is re-initialised"
        )
    target = model.state_dict()
    _refuse(f"--pretrain {snap.path}", "the weights do not fit the model", state_mismatches(target, snap.state, fresh))
    keep = {k: v for k, v in snap.state.items() if parameter_group_of(k) not in fresh}
    model.load_state_dict(keep, strict=False)

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
    return LoadReport(
        path=str(snap.path),
        origin=snap.origin,
        f1=snap.score,
        loaded=counts,
        reinitialised={g: sum(1 for k in target if parameter_group_of(k) == g) for g in sorted(fresh)},
        ignored=sorted(k for k in snap.state if parameter_group_of(k) in fresh),
        notes=notes,
    )
