"""Training: `train()` runs a whole job; `train_one_epoch` and `predict_split` are the loops.

Data is decoded once into uint8 tensors (see data.py) and, when it fits, kept on the training
device. Each epoch draws a seeded permutation, gathers uint8 batches, converts them to float
on the device and augments whole batches there; there is no per-sample Python and no
DataLoader in the hot loop. Every random stream of epoch e is seeded from (seed, e), so a run
resumed from any checkpoint replays exactly what an uninterrupted run would have done (on the
same machine, CPU).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .augment import augment_batch
from .checkpoint import (
    INTERRUPTED_NAME,
    CheckpointKeeper,
    best_name,
    choose_best,
    epoch_name,
    latest_resumable,
    load_file,
    load_pretrained,
    save_checkpoint,
)
from .config import ModelConfig, TrainConfig, merge_pretrained_config
from .data import Split, default_cache_dir, load_dataset
from .errors import UserError
from .fileio import remove_stale_temporaries, to_jsonable, write_json_atomic, write_text_atomic
from .metrics import binary_report, fisher_ratio, is_defined
from .model import OcecModel, build_model
from .optim import (
    LRSchedule,
    active_stage,
    backbone_units,
    build_optimizer,
    freeze_batchnorm_statistics,
    set_backbone_fraction,
)
from .reporting import Reporter, check_optional, progress

log = logging.getLogger("ocec")

# Flags that may change when a run is resumed (where data lives, how to run it, how long); everything
# that shapes the training itself comes from the checkpoint.
RESUME_OVERRIDABLE = (
    "epochs",
    "device",
    "num_workers",
    "cache_dir",
    "keep_last",
    "keep_best",
    "max_bad_steps",
    "save_diagnostics",
    "tensorboard",
    "data_root",
    "mix_data_root",
    "extra_val_root",
)
CLI_ONLY = {"resume", "debug", "no_cache"}


class Interrupted(Exception):
    """SIGINT/SIGTERM: a resumable checkpoint was written; the CLI exits 128 + signal."""

    def __init__(self, signum: int, checkpoint: Path):
        super().__init__(f"stopped by signal {signum}")
        self.signum, self.checkpoint = signum, checkpoint


# --- set-up helpers ------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return device


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


def remove_if_empty(folders: list[Path]) -> None:
    """Remove folders (deepest first) that a failed run created and left empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (a run started there), or already gone
            return


def next_run_dir(output_dir: Path) -> Path:
    """The next free <output_dir>/vN (never an existing one)."""
    while True:
        taken = [int(p.name[1:]) for p in output_dir.glob("v*") if p.name[1:].isdigit()]
        candidate = output_dir / f"v{max(taken, default=0) + 1}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    return (seed * 1_000_003 + epoch * 7919 + stream) % (2**63 - 1)


def amp_settings(device: torch.device, use_amp: bool) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed)."""
    if not use_amp:
        return None, False
    if device.type == "cuda":
        return torch.float16, True
    if device.type == "cpu":
        return torch.bfloat16, False
    log.warning("--use_amp: no autocast for device %s; training in float32", device)
    return None, False


@contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None):
    with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
        yield


class _BufferHandler(logging.Handler):
    """Keeps log records until the run folder exists, so train.log has the whole story."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


# --- batches ---------------------------------------------------------------------------------------


def _draw(labels: torch.Tensor, count: int, generator: torch.Generator, balanced: bool) -> torch.Tensor:
    """`count` indices into `labels`: a permutation (repeated if needed), or class-balanced with replacement."""
    if count <= 0:
        return torch.empty(0, dtype=torch.long)
    if balanced:
        per_class = torch.bincount(labels, minlength=2).clamp_min(1).double()
        return torch.multinomial(1.0 / per_class[labels], count, replacement=True, generator=generator)
    reps = math.ceil(count / len(labels))
    return torch.cat([torch.randperm(len(labels), generator=generator) for _ in range(reps)])[:count]


def epoch_order(
    primary_labels: torch.Tensor,
    mix_labels: torch.Tensor | None,
    mix_ratio: float,
    balanced: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """Indices into cat(primary, mix) for one epoch: len(primary) samples, round(mix_ratio * len) of
    them from the mix pool, shuffled together."""
    total = len(primary_labels)
    n_mix = round(mix_ratio * total) if mix_labels is not None and len(mix_labels) else 0
    primary = _draw(primary_labels, total - n_mix, generator, balanced)
    mixed = _draw(mix_labels, n_mix, generator, balanced) + total if n_mix else primary[:0]
    order = torch.cat([primary, mixed])
    return order[torch.randperm(len(order), generator=generator)]


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Full batches plus the remainder, unless the remainder is one sample (BatchNorm cannot train on it)."""
    return num_samples // batch_size + (1 if num_samples % batch_size >= 2 else 0)


def to_float(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 NCHW -> float in [0, 1] on `device`, channels-last (faster convolutions on CPU and GPU)."""
    x = batch.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last)


def place_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move the uint8 images to the GPU when they fit comfortably; otherwise keep them (pinned) on the host."""
    if device.type != "cuda":
        return images
    free, _ = torch.cuda.mem_get_info(device)
    if images.numel() < 0.5 * free:
        return images.to(device)
    log.info("images (%.1f GiB) stay in host memory; batches are copied per step", images.numel() / 2**30)
    return images.pin_memory()


@torch.no_grad()
def predict_split(
    model: OcecModel,
    images: torch.Tensor,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    desc: str = "eval",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Margin-free logits and embeddings (float32, CPU) for uint8 images, in eval mode without augmentation."""
    model.eval()
    logits, embeddings = [], []
    for start in progress(range(0, len(images), batch_size), desc=desc, unit="batch"):
        x = to_float(images[start : start + batch_size], device)
        with autocast(device, amp_dtype):
            emb = model.embed(x)
            logit = model.margin_head.logit(emb)
        logits.append(logit.float().cpu())
        embeddings.append(emb.float().cpu())
    if not logits:
        return torch.empty(0), torch.empty(0, model.head.out_features)
    return torch.cat(logits), torch.cat(embeddings)


def require_finite(logits: torch.Tensor, what: str, why: str = "the weights hold NaN or inf values") -> None:
    if not bool(torch.isfinite(logits).all()):
        raise UserError(f"{what}: outputs are not finite: {why}")


def evaluate_split(model, split: Split, batch_size, device, amp_dtype, desc="val") -> tuple[dict, np.ndarray]:
    """Margin-free BCE loss, the classification report and the Fisher ratio of one split, and its probabilities."""
    images = split.images
    logits, embeddings = predict_split(model, images, batch_size, device, amp_dtype, desc)
    require_finite(
        logits,
        f"the {desc} split",
        "training diverged (the learning rate is likely too high); the best and last good checkpoints are intact",
    )
    labels = split.labels
    loss = float(F.binary_cross_entropy_with_logits(logits, labels.float())) if len(labels) else float("nan")
    report = {"loss": loss, **binary_report(labels.numpy(), torch.sigmoid(logits).numpy())}
    report["fisher"] = fisher_ratio(embeddings, labels)
    return report, torch.sigmoid(logits).numpy()


# --- one epoch ---------------------------------------------------------------------------------------


@dataclass
class EpochState:
    """Progress inside an epoch. Statistics stay on the training device (no host sync per step);
    interrupt checkpoints save them so a stopped epoch resumes mid-way with the same numbers."""

    step: int = 0
    seen: int = 0
    loss_sum: torch.Tensor | float = 0.0  # accumulated in float64, one step after another
    logits: list = field(default_factory=list)
    labels: list = field(default_factory=list)

    def add(self, loss: torch.Tensor, logit: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum = self.loss_sum + loss.detach().double() * len(labels)
        self.seen += len(labels)
        self.logits.append(logit.detach().float())
        self.labels.append(labels)

    def mean_loss(self) -> float:
        return float(self.loss_sum) / max(1, self.seen)

    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, labels) of the epoch so far, on the CPU."""
        if not self.logits:
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        return torch.cat(self.logits).cpu(), torch.cat(self.labels).cpu()

    def to_dict(self) -> dict:
        logits, labels = self.outputs()
        loss_sum = torch.as_tensor(self.loss_sum, dtype=torch.float64).cpu()
        return {"step": self.step, "seen": self.seen, "loss_sum": loss_sum, "logits": logits, "labels": labels}

    @classmethod
    def from_dict(cls, data: dict, device: torch.device) -> "EpochState":
        return cls(
            data["step"],
            data["seen"],
            data["loss_sum"].to(device),
            [data["logits"].to(device)],
            [data["labels"].to(device)],
        )


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop finishes its current step, then saves and stops."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("signal %d received: finishing the current step, then saving a resumable checkpoint", signum)


@contextmanager
def handle_stop_signals(flag: StopFlag):
    previous = {s: signal.signal(s, flag) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@dataclass
class Run:
    """Everything one training job holds; `train()` builds it, the epoch functions use it."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    device: torch.device
    model: OcecModel
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    pool_images: torch.Tensor
    pool_labels: torch.Tensor
    class_weight: torch.Tensor | None
    run_dir: Path
    keeper: CheckpointKeeper
    stop: StopFlag
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"f1": None, "epoch": None, "path": None})
    pretrain: dict | None = None
    bad_steps: int = 0


def train_one_epoch(
    run: Run, epoch: int, order: torch.Tensor, aug_gen: torch.Generator, state: EpochState
) -> EpochState:
    cfg, model, device = run.cfg, run.model, run.device
    model.train()
    freeze_batchnorm_statistics(model)
    n_steps = steps_per_epoch(len(order), cfg.batch_size)
    params = list(model.parameters())
    bar = progress(total=n_steps, initial=state.step, desc=f"epoch {epoch}", unit="step")
    order = order.to(run.pool_images.device)
    while state.step < n_steps:
        idx = order[state.step * cfg.batch_size : (state.step + 1) * cfg.batch_size]
        x = augment_batch(to_float(run.pool_images[idx], device), cfg.augment, aug_gen)
        y = run.pool_labels[idx].to(device, non_blocking=True)
        with autocast(device, run.amp_dtype):
            loss, logit = model.margin_head.training_loss(model.embed(x), y, run.class_weight)
        run.optimizer.zero_grad(set_to_none=True)
        finite = torch.isfinite(loss)
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
            run.scaler.unscale_(run.optimizer)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        # The GradScaler owns fp16 overflow (it skips those steps and lowers its scale); without one a
        # non-finite gradient is ours to skip.
        ok = bool(finite if run.scaler is not None else finite & torch.isfinite(grad_norm))
        if ok:
            if run.scaler is not None:
                run.scaler.step(run.optimizer)
                run.scaler.update()
            else:
                run.optimizer.step()
            run.bad_steps = 0
            state.add(loss, logit, y)
        else:
            run.optimizer.zero_grad(set_to_none=True)
            if run.scaler is not None:
                run.scaler.update()
            run.bad_steps += 1
            log.warning(
                "epoch %d step %d: non-finite %s, step skipped (%d in a row)",
                epoch,
                state.step + 1,
                "loss" if not bool(finite) else "gradient",
                run.bad_steps,
            )
            if run.bad_steps >= cfg.max_bad_steps:
                raise UserError(
                    f"{run.bad_steps} consecutive training steps were non-finite (epoch {epoch}, step "
                    f"{state.step + 1}): the learning rate ({run.schedule.lrs()}) is likely too high or "
                    f"the data broken; the best and last good checkpoints in {run.run_dir} are intact"
                )
        run.schedule.step()
        state.step += 1
        bar.update(1)
        if run.stop.signum is not None:
            break
    bar.close()
    return state


# --- the job --------------------------------------------------------------------------------------------


def _resume_config(path: Path, cfg: TrainConfig, model_cfg: ModelConfig, typed: set[str]):
    raw = load_file(path, "--resume")
    if raw.get("ocec_format") is None:
        raise UserError(
            f"--resume {path}: not an ocec training checkpoint (use --pretrain to start from foreign weights)"
        )
    saved_model = ModelConfig.from_dict(raw["model_config"])
    saved_train = TrainConfig.from_dict(raw["train_config"])
    merge_pretrained_config(saved_model, model_cfg, typed - {"margin_method", "dropout"}, "--resume")
    if "margin_method" in typed and model_cfg.margin_method != saved_model.margin_method:
        raise UserError(
            f"--resume: margin_method: checkpoint={saved_model.margin_method}, given={model_cfg.margin_method}"
        )
    for name in RESUME_OVERRIDABLE:
        if name in typed:
            setattr(saved_train, name, getattr(cfg, name))
    ignored = sorted(typed - set(RESUME_OVERRIDABLE) - CLI_ONLY - set(vars(model_cfg)))
    if ignored:
        log.warning(
            "--resume: these flags are taken from the checkpoint, not the command line: %s",
            ", ".join("--" + n for n in ignored),
        )
    saved_train.resume = str(path)
    return raw, saved_model, saved_train.validate()


def _class_weight(open_share: float, balance: str) -> torch.Tensor | None:
    """Per-class loss weights [closed, open] that make both classes count equally (--balance pos_weight)."""
    if balance != "pos_weight":
        return None
    share = min(max(open_share, 1e-3), 1 - 1e-3)
    return torch.tensor([0.5 / (1 - share), 0.5 / share], dtype=torch.float32)


def _load_data(cfg: TrainConfig, image_size, cache_dir):
    common = dict(
        ratios=(cfg.train_ratio, cfg.val_ratio, cfg.test_ratio),
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        cache_dir=cache_dir,
        max_bad_fraction=cfg.max_bad_fraction,
    )
    data = load_dataset(cfg.data_root, image_size, name="data", **common)
    train_split = data.get("train")
    if train_split is None:
        raise UserError(f"--data_root {cfg.data_root}: the train split is empty")
    val = data.get("val")
    if val is not None and len(set(val.labels.tolist())) < 2:
        log.warning("data: the val split has only one class: F1 and ROC-AUC may be undefined (null)")
    mix = None
    if cfg.mix_data_root:
        mix = load_dataset(cfg.mix_data_root, image_size, name="mix", **common).get("train")
        if mix is None:
            raise UserError(f"--mix_data_root {cfg.mix_data_root}: its train split is empty")
    extra = None
    if cfg.extra_val_root:
        extra = load_dataset(cfg.extra_val_root, image_size, name="extra_val", **common).get("val")
        if extra is None:
            raise UserError(f"--extra_val_root {cfg.extra_val_root}: its val split is empty")
    return data, train_split, mix, extra


def train(cfg: TrainConfig, model_cfg: ModelConfig, typed: set[str] = frozenset()) -> Path:
    """Run a training job end to end; returns the run folder."""
    buffer = _BufferHandler()
    log.addHandler(buffer)
    created: list[Path] = []
    try:
        return _train(cfg, model_cfg, set(typed), buffer, created)
    except BaseException:
        remove_if_empty(created)  # a failed command leaves no new, empty output folder behind
        raise
    finally:
        log.removeHandler(buffer)
        for handler in [h for h in log.handlers if getattr(h, "_ocec_run_log", False)]:
            log.removeHandler(handler)
            handler.close()


def _train(
    cfg: TrainConfig, model_cfg: ModelConfig, typed: set[str], buffer: _BufferHandler, created: list[Path]
) -> Path:
    cfg.validate()
    check_optional(cfg.tensorboard, cfg.save_diagnostics)
    device = resolve_device(cfg.device)
    resume_raw = snapshot = None
    if cfg.resume:
        resume_path = Path(cfg.resume).expanduser()
        if resume_path.is_dir():
            resume_path = latest_resumable(resume_path)
        resume_raw, model_cfg, cfg = _resume_config(resume_path, cfg, model_cfg, typed)
        run_dir = resume_path.parent
        check_writable(run_dir, "--resume")
        log.info(
            "resuming %s from epoch %d%s",
            run_dir,
            resume_raw["epoch"],
            f" step {resume_raw['step']}" if resume_raw.get("step") else "",
        )
    else:
        output_dir = check_writable(cfg.output_dir, created=created)
        if cfg.pretrain:
            snapshot, why = choose_best(cfg.pretrain)
            log.info("pretrain: chose %s", why)
            model_cfg = merge_pretrained_config(snapshot.model_config, model_cfg, typed)
    model_cfg.validate()
    cache_dir = None if cfg.cache_dir == "" else (cfg.cache_dir or default_cache_dir())
    data, train_split, mix, extra = _load_data(cfg, model_cfg.image_size, cache_dir)
    val_split = data.get("val")

    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg).to(device, memory_format=torch.channels_last)
    pretrain_info = None
    if snapshot is not None:
        report = load_pretrained(model, snapshot, cfg.reinit_head, cfg.margin_init)
        log.info(report.line())
        pretrain_info = {
            "path": str(snapshot.path),
            "origin": snapshot.origin,
            "f1": snapshot.score,
            "loaded": report.loaded,
            "reinitialised": report.reinitialised,
        }
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "model: %s backbone, %s head, %s margin head, %d blocks, %d base channels, %d parameters, image %dx%d",
        model_cfg.arch_variant,
        model_cfg.resolved_head,
        model_cfg.margin_method,
        model_cfg.num_blocks,
        model_cfg.base_channels,
        n_params,
        *model_cfg.image_size,
    )

    amp_dtype, needs_scaler = amp_settings(device, cfg.use_amp)
    optimizer = build_optimizer(model, cfg.group_lrs, cfg.weight_decay)
    n_steps = steps_per_epoch(len(train_split), cfg.batch_size)
    schedule = LRSchedule(
        optimizer,
        cfg.group_lrs,
        n_steps,
        cfg.warmup_epochs,
        cfg.plateau_factor,
        cfg.plateau_patience,
        "max" if cfg.plateau_metric == "val_f1" else "min",
        cfg.min_lr,
    )
    scaler = torch.amp.GradScaler("cuda") if needs_scaler else None

    pool_images = torch.cat([train_split.images, mix.images]) if mix is not None else train_split.images
    pool_labels = torch.cat([train_split.labels, mix.labels]) if mix is not None else train_split.labels
    open_share = float(train_split.labels.double().mean()) * (1 - cfg.mix_ratio)
    if mix is not None:
        open_share += float(mix.labels.double().mean()) * cfg.mix_ratio
    class_weight = _class_weight(open_share, cfg.balance)

    if resume_raw is None:
        run_dir = next_run_dir(output_dir)
    _attach_run_log(run_dir, buffer)
    remove_stale_temporaries(run_dir)

    pool_images = place_images(pool_images, device)
    run = Run(
        cfg,
        model_cfg,
        device,
        model,
        optimizer,
        schedule,
        scaler,
        amp_dtype,
        pool_images,
        pool_labels.to(pool_images.device),  # indexed by the same batch indices, once per step
        None if class_weight is None else class_weight.to(device),
        run_dir,
        CheckpointKeeper(run_dir, cfg.keep_last, cfg.keep_best),
        StopFlag(),
        pretrain=pretrain_info,
    )
    start_epoch, partial = 1, None
    if resume_raw is not None:
        start_epoch, partial = _restore(run, resume_raw)
    else:
        log.info("run folder: %s", run_dir)
        write_json_atomic(
            run_dir / "config.json",
            {
                "model": model_cfg.to_dict(),
                "train": cfg.to_dict(),
                "pretrain": pretrain_info,
                "device": str(device),
                "ocec_version": __version__,
            },
        )
    reporter = Reporter(run_dir, cfg.tensorboard, cfg.save_diagnostics)
    try:
        with handle_stop_signals(run.stop):
            _epochs(run, start_epoch, partial, train_split, val_split, extra, mix, reporter)
    finally:
        reporter.close()
    _write_summary(run)
    log.info("done: best F1 %s at epoch %s -> %s", _fmt(run.best["f1"]), run.best["epoch"], run.best["path"])
    return run_dir


def _attach_run_log(run_dir: Path, buffer: _BufferHandler) -> None:
    """From now on log to <run>/train.log too, starting with what was logged before the folder existed."""
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler._ocec_run_log = True
    for record in buffer.records:
        handler.handle(record)
    log.removeHandler(buffer)
    log.addHandler(handler)


def _restore(run: Run, raw: dict) -> tuple[int, EpochState | None]:
    run.model.load_state_dict(raw["model_state"])
    run.optimizer.load_state_dict(raw["optimizer_state"])
    run.schedule.load_state_dict(raw["schedule_state"])
    if run.scaler is not None and raw.get("scaler_state"):
        run.scaler.load_state_dict(raw["scaler_state"])
    run.history = list(raw.get("history") or [])
    run.best = dict(raw.get("best") or run.best)
    run.pretrain = raw.get("pretrain")
    epoch, step = raw["epoch"], raw.get("step", 0)
    stale = run.keeper.drop_after(epoch - (1 if step else 0))
    if stale:
        log.info("resume: removed checkpoints of epochs after the resumed one: %s", ", ".join(p.name for p in stale))
    if step:  # an interrupted epoch: continue it where it stopped
        torch.set_rng_state(raw["rng"]["torch"])
        return epoch, (EpochState.from_dict(raw["partial"], run.device), raw["rng"])
    return epoch + 1, None


def _fmt(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if is_defined(value) else "n/a"


def _payload(run: Run, epoch: int, metrics: dict, score: float | None, step: int = 0, extra: dict | None = None):
    return {
        "ocec_format": 1,
        "ocec_version": __version__,
        "model_config": run.model_cfg.to_dict(),
        "train_config": run.cfg.to_dict(),
        "normalization": {
            "mean": list(run.model_cfg.mean),
            "std": list(run.model_cfg.std),
            "image_size": list(run.model_cfg.image_size),
        },
        "label_map": {0: "closed", 1: "open"},
        "epoch": epoch,
        "step": step,
        "model_state": run.model.state_dict(),
        "optimizer_state": run.optimizer.state_dict(),
        "schedule_state": run.schedule.state_dict(),
        "scaler_state": run.scaler.state_dict() if run.scaler is not None else None,
        "metrics": to_jsonable(metrics),
        "score": score,
        "best": dict(run.best),
        "history": list(run.history),
        "pretrain": run.pretrain,
        **(extra or {}),
    }


def _apply_stage(run: Run, epoch: int, start_epoch: int, mid_epoch: bool) -> None:
    stages = run.cfg.stage_plan()
    if not stages:
        return
    stage = active_stage(stages, epoch)
    fraction = 1.0 if stage is None else stage.fraction
    units = set_backbone_fraction(run.model, fraction)
    begins_now = stage is not None and stage.epoch == epoch
    if begins_now and not mid_epoch:
        if epoch > 1:
            run.schedule.restart_warmup("backbone", run.cfg.stage_warmup_epochs, stage.backbone_lr)
        elif stage.backbone_lr is not None:
            run.schedule.set_base("backbone", stage.backbone_lr)
    if begins_now or epoch == start_epoch:
        total = len(backbone_units(run.model))
        log.info(
            "stage from epoch %d: %d/%d backbone units trainable (%s)%s",
            stage.epoch if stage else 1,
            len(units),
            total,
            ", ".join(units) or "backbone frozen",
            f", backbone lr {run.schedule.base['backbone']:.2e}"
            + (f", re-warming over {run.cfg.stage_warmup_epochs:g} epoch(s)" if begins_now and epoch > 1 else "")
            if units
            else "",
        )


def _epochs(run: Run, start_epoch: int, partial, train_split, val_split, extra, mix, reporter) -> None:
    cfg = run.cfg
    for epoch in range(start_epoch, cfg.epochs + 1):
        mid_epoch = partial is not None
        _apply_stage(run, epoch, start_epoch, mid_epoch)
        index_gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, 1))
        aug_gen = torch.Generator(device=run.device).manual_seed(epoch_seed(cfg.seed, epoch, 2))
        if mid_epoch:
            state, rng = partial
            aug_gen.set_state(rng["aug"])
        else:
            torch.manual_seed(epoch_seed(cfg.seed, epoch, 3))
            state = EpochState()
        partial = None
        order = epoch_order(
            train_split.labels,
            mix.labels if mix is not None else None,
            cfg.mix_ratio,
            cfg.balance == "sampler",
            index_gen,
        )
        tic = time.time()
        state = train_one_epoch(run, epoch, order, aug_gen, state)
        train_seconds = time.time() - tic
        if run.stop.signum is not None and state.step < steps_per_epoch(len(order), cfg.batch_size):
            path = save_checkpoint(
                run.run_dir / INTERRUPTED_NAME,
                _payload(
                    run,
                    epoch,
                    {},
                    None,
                    step=state.step,
                    extra={
                        "partial": state.to_dict(),
                        "rng": {"torch": torch.get_rng_state(), "aug": aug_gen.get_state()},
                    },
                ),
            )
            _stop_message(run, path)
        _end_epoch(run, epoch, state, train_seconds, tic, val_split, extra, reporter)
        if run.stop.signum is not None:
            _stop_message(run, run.run_dir / epoch_name(epoch))


def _stop_message(run: Run, path: Path):
    log.warning("stopped; resume with: python -m ocec train --resume %s", run.run_dir)
    raise Interrupted(run.stop.signum, path)


def _end_epoch(
    run: Run, epoch: int, state: EpochState, train_seconds: float, started: float, val_split, extra, reporter
) -> None:
    cfg = run.cfg
    logits, labels = state.outputs()
    train_metrics = {"loss": state.mean_loss(), **binary_report(labels.numpy(), torch.sigmoid(logits).numpy())}
    metrics = {"train": train_metrics}
    val_probs = None
    if val_split is not None:
        metrics["val"], val_probs = evaluate_split(run.model, val_split, cfg.batch_size, run.device, run.amp_dtype)
    if extra is not None:
        metrics["extra_val"], _ = evaluate_split(
            run.model, extra, cfg.batch_size, run.device, run.amp_dtype, "extra_val"
        )
    source = "val" if val_split is not None else "train"
    score = metrics[source]["f1"]
    plateau_value = metrics[source]["loss" if cfg.plateau_metric == "val_loss" else "f1"]
    lrs = run.schedule.lrs()
    reduced = run.schedule.end_epoch(plateau_value)

    row = {"epoch": epoch}
    for split_name, values in metrics.items():
        row.update({f"{split_name}_{k}": v for k, v in values.items()})
    row.update({f"lr_{g}": v for g, v in lrs.items()})
    row["seconds"] = round(train_seconds, 3)
    row["wall_seconds"] = round(time.time() - started, 3)  # training and evaluation
    row["images_per_s"] = round(state.seen / train_seconds, 1) if train_seconds > 0 else None
    row["trainable_backbone_units"] = sum(
        1
        for u in backbone_units(run.model)
        if any(p.requires_grad for p in run.model.backbone.get_submodule(u).parameters())
    )
    run.history.append(to_jsonable(row))

    improved = is_defined(score) and (run.best["f1"] is None or score > run.best["f1"])
    if improved:
        run.best = {"f1": float(score), "epoch": epoch, "path": str(run.run_dir / best_name(epoch, score))}
        run.keeper.save_best(epoch, score, _payload(run, epoch, metrics, score))
    run.keeper.save_epoch(epoch, _payload(run, epoch, metrics, score))
    (run.run_dir / INTERRUPTED_NAME).unlink(missing_ok=True)
    _write_history(run)
    _write_summary(run)
    reporter.epoch_end(row, val_split.labels.numpy() if val_split is not None else None, val_probs)

    text = f"epoch {epoch}/{cfg.epochs} train loss {_fmt(train_metrics['loss'])} f1 {_fmt(train_metrics['f1'])}"
    if "val" in metrics:
        v = metrics["val"]
        text += (
            f" | val loss {_fmt(v['loss'])} f1 {_fmt(v['f1'])} auc {_fmt(v['roc_auc'], 3)} "
            f"fisher {_fmt(v['fisher'], 3)}"
        )
    if "extra_val" in metrics:
        text += f" | extra_val f1 {_fmt(metrics['extra_val']['f1'])}"
    text += " | lr " + " ".join(f"{g} {v:.2e}" for g, v in lrs.items())
    text += f" | {train_seconds:.1f}s {row['images_per_s'] or 0:.0f} img/s"
    if improved:
        text += " [best]"
    log.info(text)
    if reduced:
        log.info(
            "plateau: %s did not improve for %d epoch(s); learning rates x%g -> %s",
            cfg.plateau_metric,
            cfg.plateau_patience + 1,
            cfg.plateau_factor,
            ", ".join(f"{g} {v:.2e}" for g, v in run.schedule.lrs().items()),
        )


def _write_history(run: Run) -> None:
    write_json_atomic(run.run_dir / "history.json", run.history)
    columns = list(dict.fromkeys(k for row in run.history for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(run.history)
    write_text_atomic(run.run_dir / "history.csv", buffer.getvalue())


def _write_summary(run: Run) -> None:
    last = run.history[-1] if run.history else {}
    rates = [r["images_per_s"] for r in run.history if r.get("images_per_s")]
    epoch_files = sorted(run.run_dir.glob("ocec_epoch_*.pt"))
    write_json_atomic(
        run.run_dir / "summary.json",
        {
            "run_dir": str(run.run_dir),
            "best_epoch": run.best["epoch"],
            "best_f1": run.best["f1"],
            "best_checkpoint": run.best["path"],
            "selection": "val_f1" if "val_f1" in last else "train_f1",
            "last_epoch": last.get("epoch"),
            "last_checkpoint": str(epoch_files[-1]) if epoch_files else None,
            "final_val_f1": last.get("val_f1"),
            "final_train_f1": last.get("train_f1"),
            "best_val_fisher": max(
                (r["val_fisher"] for r in run.history if is_defined(r.get("val_fisher"))), default=None
            ),
            "epochs": run.cfg.epochs,
            "epochs_completed": len(run.history),
            "train_seconds": round(sum(r.get("seconds") or 0 for r in run.history), 2),
            "wall_seconds": round(sum(r.get("wall_seconds") or 0 for r in run.history), 2),
            "images_per_s": round(sum(rates) / len(rates), 1) if rates else None,
            "pretrain": run.pretrain,
            "device": str(run.device),
        },
    )
