"""Training: `train()` runs a whole job, `train_one_epoch()` one pass over the training data.

`train()` reads top to bottom: settle the configs (fresh, `--pretrain` or `--resume`), load the
data, build the model and what updates it, then for each epoch: enter its freezing stage, train,
evaluate, step the plateau schedule, keep checkpoints. Data is decoded once into uint8 tensors
(data.py); each step gathers a batch, converts and augments it on the device (no DataLoader, no
per-sample Python). Every random stream of epoch e is seeded from (seed, e) (sampling.py), so a
resumed run replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import logging
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .augment import augment_batch
from .checkpoint import (
    INTERRUPTED_NAME,
    Best,
    CheckpointKeeper,
    RunRecord,
    best_name,
    epoch_name,
    save_checkpoint,
    training_payload,
)
from .config import ModelConfig, TrainConfig
from .data import TrainingData, load_training_data
from .errors import Interrupted, UserError
from .fileio import remove_stale_temporaries, to_jsonable, write_json_atomic
from .inference import evaluate_split
from .metrics import binary_report, is_defined
from .optim import Learner, count_trainable_units, enter_epoch_stage, freeze_batchnorm_statistics
from .reporting import Reporter, check_optional, epoch_line, epoch_row, fmt, progress
from .rundir import check_writable, next_run_dir, removed_if_left_empty, run_log, write_history, write_summary
from .runtime import StopFlag, amp_dtype, autocast, resolve_device, stop_signals
from .sampling import (
    AUGMENT_STREAM,
    DROPOUT_STREAM,
    ORDER_STREAM,
    TrainingPool,
    epoch_generator,
    epoch_order,
    epoch_seed,
    steps_per_epoch,
    to_float,
)
from .start import describe_model, load_pretrained_weights, plan_start, selection_metric

log = logging.getLogger("ocec")


def train(**settings) -> Path:
    """Run one training job and return its run folder. `settings` are `ocec train`'s flags by name
    (e.g. `data_root=`, `epochs=`, `pretrain=[...]`); unset ones take their defaults, or the values of
    the `--pretrain`/`--resume` checkpoint."""
    with run_log() as attach_log, removed_if_left_empty() as created:
        start = plan_start(settings)
        cfg, model_cfg = start.cfg, start.model_cfg
        check_optional(cfg.tensorboard, cfg.save_diagnostics)
        device = resolve_device(cfg.device)
        if start.resume:
            output_dir = check_writable(start.resume_path.parent, "--resume")
        else:
            output_dir = check_writable(cfg.output_dir, created=created)
        data = load_training_data(cfg, model_cfg.image_size)

        torch.manual_seed(cfg.seed)
        learner = Learner.build(model_cfg, cfg, steps_per_epoch(len(data.train), cfg.batch_size), device)
        pretrain = load_pretrained_weights(learner.model, start)
        log.info(describe_model(learner.model))
        pool = TrainingPool.build(data.train, data.mix, mix_ratio=cfg.mix_ratio, balance=cfg.balance, device=device)

        run_dir = output_dir if start.resume else next_run_dir(output_dir, created)
        attach_log(run_dir)
        remove_stale_temporaries(run_dir)
        job = Job(cfg, model_cfg, learner, pool, data, device, amp_dtype(device, cfg.use_amp), run_dir)
        job.record = RunRecord([], Best(selection_metric(data)), pretrain)
        first_epoch, partial = 1, None
        if start.resume:
            first_epoch, partial = resume_job(job, start.resume)
        else:
            log.info("run folder: %s", run_dir)
            meta = {"pretrain": pretrain, "device": str(device), "ocec_version": __version__}
            write_json_atomic(run_dir / "config.json", {"model": model_cfg.to_dict(), "train": cfg.to_dict(), **meta})

        with stop_signals() as stop, closing(Reporter(run_dir, cfg.tensorboard, cfg.save_diagnostics)) as reporter:
            for epoch in range(first_epoch, cfg.epochs + 1):
                stage = enter_epoch_stage(
                    learner.model,
                    learner.schedule,
                    cfg.stage_plan(),
                    epoch,
                    rewarm_epochs=cfg.stage_warmup_epochs,
                    announce=epoch == first_epoch,
                    mid_epoch=partial is not None,
                )
                if stage:
                    log.info(stage)
                started = time.time()
                state = train_one_epoch(job, epoch, stop, partial)
                partial = None
                if stop.signum is not None and not state.finished:
                    stop_run(job, stop, save_interrupted(job, epoch, state))
                end_epoch(job, epoch, state, seconds=time.time() - started, started=started, reporter=reporter)
                if stop.signum is not None:
                    stop_run(job, stop, run_dir / epoch_name(epoch))
        _write_summary(job)
        best = job.record.best
        log.info("done: best F1 %s at epoch %s (by %s) -> %s", fmt(best.f1), best.epoch, best.metric, best.path)
        return run_dir


@dataclass
class Job:
    """One training job's parts, as the epoch functions need them."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    learner: Learner
    pool: TrainingPool
    data: TrainingData
    device: torch.device
    amp_dtype: torch.dtype | None
    run_dir: Path
    record: RunRecord | None = None
    bad_steps: int = 0  # consecutive non-finite steps

    @property
    def keeper(self) -> CheckpointKeeper:
        return CheckpointKeeper(self.run_dir, self.cfg.keep_last, self.cfg.keep_best)

    def payload(self, epoch: int, **fields) -> dict:
        states, record = self.learner.state_dict(), self.record.to_dict()
        return training_payload(
            model_cfg=self.model_cfg, train_cfg=self.cfg, states=states, record=record, epoch=epoch, **fields
        )


# --- one epoch -----------------------------------------------------------------------------------


@dataclass
class EpochState:
    """Progress inside an epoch; interrupt checkpoints save it (with the augmentation generator's
    state), so a stopped epoch resumes mid-way with the same statistics. Sums stay on the device."""

    total_steps: int = 0
    aug_gen: torch.Generator | None = None
    step: int = 0
    seen: int = 0
    loss_sum: torch.Tensor | float = 0.0  # accumulated in float64, one step after another
    logits: list = field(default_factory=list)
    labels: list = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

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
    def from_dict(cls, data: dict, aug_gen: torch.Generator) -> "EpochState":
        device = aug_gen.device
        logits, labels = [data["logits"].to(device)], [data["labels"].to(device)]
        return cls(0, aug_gen, data["step"], data["seen"], data["loss_sum"].to(device), logits, labels)


def train_one_epoch(job: Job, epoch: int, stop: StopFlag, partial: EpochState | None = None) -> EpochState:
    """One pass over the epoch's seeded sample order; stops early (state.finished False) on a signal.
    `partial` continues an interrupted epoch."""
    cfg, pool, device = job.cfg, job.pool, job.device
    model, optimizer, scaler = job.learner.model, job.learner.optimizer, job.learner.scaler
    mix_labels = job.data.mix.labels if job.data.mix is not None else None
    order_gen = epoch_generator(cfg.seed, epoch, ORDER_STREAM)
    order = epoch_order(job.data.train.labels, mix_labels, cfg.mix_ratio, cfg.balance == "sampler", order_gen)
    order = order.to(pool.images.device)
    if partial is None:
        torch.manual_seed(epoch_seed(cfg.seed, epoch, DROPOUT_STREAM))
        partial = EpochState(aug_gen=epoch_generator(cfg.seed, epoch, AUGMENT_STREAM, device))
    state = partial
    state.total_steps = steps_per_epoch(len(order), cfg.batch_size)
    model.train()
    freeze_batchnorm_statistics(model)
    params = list(model.parameters())
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    bar = progress(total=state.total_steps, initial=state.step, desc=f"epoch {epoch}", unit="step")
    while not state.finished and stop.signum is None:
        idx = order[state.step * cfg.batch_size : (state.step + 1) * cfg.batch_size]
        x = augment_batch(to_float(pool.images[idx], device), cfg.augment, state.aug_gen)
        y = pool.labels[idx].to(device, non_blocking=True)
        with autocast(device, job.amp_dtype):
            loss, logit = model.margin_head.training_loss(model.embed(x), y, pool.class_weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # An active GradScaler owns fp16 overflow (it skips those steps and lowers its scale);
        # otherwise a non-finite loss or gradient is ours to skip. This reads one value per step.
        finite = torch.isfinite(loss) if scaler.is_enabled() else torch.isfinite(loss) & torch.isfinite(grad_norm)
        if bool(finite):
            scaler.step(optimizer)
            job.bad_steps = 0
            state.add(loss, logit, y)
        else:
            optimizer.zero_grad(set_to_none=True)
            skip_step(job, epoch, state.step + 1, "loss" if not torch.isfinite(loss) else "gradient")
        scaler.update()
        job.learner.schedule.step()
        state.step += 1
        bar.update(1)
    bar.close()
    return state


def skip_step(job: Job, epoch: int, step: int, what: str) -> None:
    job.bad_steps += 1
    log.warning("epoch %d step %d: non-finite %s, step skipped (%d in a row)", epoch, step, what, job.bad_steps)
    if job.bad_steps >= job.cfg.max_bad_steps:
        raise UserError(
            f"{job.bad_steps} consecutive training steps were non-finite (epoch {epoch}, step {step}): the "
            f"learning rate ({job.learner.schedule.lrs()}) is likely too high or the data broken; the best and "
            f"last good checkpoints in {job.run_dir} are intact"
        )


# --- the end of an epoch: evaluate, schedule, keep -----------------------------------------------


def end_epoch(job: Job, epoch: int, state: EpochState, *, seconds: float, started: float, reporter: Reporter) -> None:
    cfg, schedule, record, model = job.cfg, job.learner.schedule, job.record, job.learner.model
    logits, labels = state.outputs()
    metrics = {"train": {"loss": state.mean_loss(), **binary_report(labels.numpy(), torch.sigmoid(logits).numpy())}}
    val_probs = None
    evaluate = dict(batch_size=cfg.batch_size, device=job.device, amp_dtype=job.amp_dtype)
    if job.data.val is not None:
        metrics["val"], val_probs = evaluate_split(model, job.data.val, **evaluate)
    if job.data.extra_val is not None:
        metrics["extra_val"], _ = evaluate_split(model, job.data.extra_val, desc="extra_val", **evaluate)
    source = metrics["val" if "val" in metrics else "train"]
    lrs = schedule.lrs()
    reduced = schedule.end_epoch(source["loss" if cfg.plateau_metric == "val_loss" else "f1"])
    row = epoch_row(epoch, metrics, lrs, seconds=seconds, wall_seconds=time.time() - started, seen=state.seen)
    row["trainable_backbone_units"] = count_trainable_units(model)
    record.history.append(to_jsonable(row))

    f1, score = _defined(source["f1"]), row[record.best.metric]
    improved = record.best.improved_by(score)
    if improved:
        name = best_name(epoch, f1) if record.best.metric.endswith("f1") else best_name(epoch, score, "loss")
        record.best = Best(record.best.metric, float(score), f1, epoch, str(job.run_dir / name))
    saved = job.keeper.save_epoch(epoch, job.payload(epoch, metrics=metrics, score=f1))
    if improved:
        job.keeper.copy_to_best(saved, Path(record.best.path).name)
    (job.run_dir / INTERRUPTED_NAME).unlink(missing_ok=True)
    write_history(job.run_dir, record.history)
    _write_summary(job)
    reporter.epoch_end(row, job.data.val.labels.numpy() if job.data.val is not None else None, val_probs)
    log.info(epoch_line(row, cfg.epochs, improved))
    if reduced:
        log.info(
            "plateau: %s did not improve for %d epoch(s); learning rates x%g (floor %g) -> %s",
            cfg.plateau_metric,
            cfg.plateau_patience + 1,
            cfg.plateau_factor,
            cfg.min_lr,
            ", ".join(f"{g} {v:.2e}" for g, v in schedule.lrs().items()),
        )


def _write_summary(job: Job) -> None:
    record = job.record
    write_summary(
        job.run_dir,
        record.history,
        record.best.to_dict(),
        epochs=job.cfg.epochs,
        pretrain=record.pretrain,
        device=job.device,
    )


# --- stopping and resuming -----------------------------------------------------------------------


def save_interrupted(job: Job, epoch: int, state: EpochState) -> Path:
    rng = {"torch": torch.get_rng_state(), "aug": state.aug_gen.get_state()}
    payload = job.payload(epoch, step=state.step, extra={"partial": state.to_dict(), "rng": rng})
    return save_checkpoint(job.run_dir / INTERRUPTED_NAME, payload)


def stop_run(job: Job, stop: StopFlag, checkpoint: Path):
    log.warning("stopped; resume with: python -m ocec train --resume %s", job.run_dir)
    raise Interrupted(stop.signum, checkpoint)


def resume_job(job: Job, raw: dict) -> tuple[int, EpochState | None]:
    """Restore weights, optimizer, schedule and record -> (the epoch to continue with, the state of
    an interrupted epoch or None)."""
    job.learner.load_state_dict(raw)
    job.record = RunRecord.from_dict(raw)
    epoch, step = raw["epoch"], raw.get("step", 0)
    stale = job.keeper.drop_after(epoch - (1 if step else 0))
    if stale:
        log.info("resume: removed checkpoints of epochs after the resumed one: %s", ", ".join(p.name for p in stale))
    if not step:
        return epoch + 1, None
    torch.set_rng_state(raw["rng"]["torch"])  # an interrupted epoch continues where it stopped
    aug_gen = torch.Generator(device=job.device)
    aug_gen.set_state(raw["rng"]["aug"])
    return epoch, EpochState.from_dict(raw["partial"], aug_gen)


def _defined(value) -> float | None:
    return float(value) if is_defined(value) else None
