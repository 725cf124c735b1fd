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
from dataclasses import dataclass
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
from .epoch import EpochState
from .errors import Interrupted, UserError
from .fileio import remove_stale_temporaries, to_jsonable, write_json_atomic
from .finetune import L2SP, adapt_batchnorm, describe_layer_decay, hard_weights, weight_ema, zero_shot_report
from .inference import evaluate_split
from .metrics import binary_report, is_defined
from .optim import Learner, count_trainable_units, enter_epoch_stage, freeze_batchnorm_statistics, optimizer_step
from .reporting import Reporter, check_optional, epoch_line, epoch_row, fmt, progress
from .rundir import check_writable, next_run_dir, removed_if_left_empty, run_log, write_history, write_summary
from .runtime import StopFlag, amp_dtype, autocast, keep_freed_memory, resolve_device, stop_signals
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
        if device.type == "cpu":
            keep_freed_memory()
        if start.resume:
            output_dir = check_writable(start.resume_path.parent, "--resume")
        else:
            output_dir = check_writable(cfg.output_dir, created=created)
        data = load_training_data(cfg, model_cfg.image_size)

        torch.manual_seed(cfg.seed)
        learner = Learner.build(model_cfg, cfg, steps_per_epoch(len(data.train), cfg.batch_size), device)
        pretrain = load_pretrained_weights(learner.model, start)
        log.info(describe_model(learner.model))
        if pretrain is not None:  # model A on B before any step; --bn_adapt keeps the adapted statistics
            pretrain["zero_shot"] = zero_shot_report(
                learner.model,
                data.train,
                data.val,
                adapt=cfg.bn_adapt,
                batch_size=cfg.batch_size,
                device=device,
                seed=cfg.seed,
            )
        attach_finetuning(learner, cfg, anchor=(start.resume or {}).get("l2sp_anchor"))
        primary = [data.train] + ([data.extra_train] if data.extra_train is not None else [])
        pool = TrainingPool.build(primary, data.mix, mix_ratio=cfg.mix_ratio, balance=cfg.balance, device=device)

        run_dir = output_dir if start.resume else next_run_dir(output_dir, created)
        attach_log(run_dir)
        remove_stale_temporaries(run_dir)
        job = Job(cfg, model_cfg, learner, pool, data, device, amp_dtype(device, cfg.use_amp), run_dir)
        if cfg.hard_mining > 0:
            job.sample_losses = torch.full((pool.primary,), float("nan"))
        job.record = RunRecord([], Best(selection_metric(data)), pretrain)
        first_epoch, partial = 1, None
        if start.resume:
            first_epoch, partial = resume_job(job, start.resume)
        else:
            log.info("run folder: %s", run_dir)
            meta = {"pretrain": pretrain, "filled_in": start.filled, "device": str(device), "ocec_version": __version__}
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
                    side=cfg.unfreeze_from,
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
    sample_losses: torch.Tensor | None = None  # --hard_mining: each train sample's last loss (NaN: not yet seen)

    @property
    def keeper(self) -> CheckpointKeeper:
        return CheckpointKeeper(self.run_dir, self.cfg.keep_last, self.cfg.keep_best)

    def payload(self, epoch: int, **fields) -> dict:
        states, record = self.learner.state_dict(), self.record.to_dict()
        if self.sample_losses is not None:
            states["sample_losses"] = self.sample_losses.clone()
        return training_payload(
            model_cfg=self.model_cfg, train_cfg=self.cfg, states=states, record=record, epoch=epoch, **fields
        )


# --- one epoch -----------------------------------------------------------------------------------


def train_one_epoch(job: Job, epoch: int, stop: StopFlag, partial: dict | None = None) -> EpochState:
    """One pass over the epoch's seeded sample order; stops early (state.finished False) on a signal.
    `partial` (an interrupted epoch's saved state and generator states) continues it."""
    cfg, device = job.cfg, job.device
    order_gen = epoch_generator(cfg.seed, epoch, ORDER_STREAM)
    hard = None
    if job.sample_losses is not None and not torch.isnan(job.sample_losses).all():
        hard = (cfg.hard_mining, hard_weights(job.sample_losses))
    pool = job.pool
    order = epoch_order(
        pool.primary_labels, pool.mix_labels, cfg.mix_ratio, cfg.balance == "sampler", order_gen, hard=hard
    )
    aug_gen = epoch_generator(cfg.seed, epoch, AUGMENT_STREAM, device)
    state = EpochState(order.to(job.pool.device), cfg.batch_size, aug_gen)
    if partial is None:
        torch.manual_seed(epoch_seed(cfg.seed, epoch, DROPOUT_STREAM))
    else:
        torch.set_rng_state(partial["rng"]["torch"])
        aug_gen.set_state(partial["rng"]["aug"])
        state.load(partial["partial"])
    return continue_epoch(job, epoch, state, stop)


def continue_epoch(job: Job, epoch: int, state: EpochState, stop: StopFlag) -> EpochState:
    """The steps of an epoch from `state.step` on, until it ends or `stop` is raised."""
    cfg, pool, device, learner = job.cfg, job.pool, job.device, job.learner
    learner.model.train()
    freeze_batchnorm_statistics(learner.model)
    params = list(learner.model.parameters())
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    check_every = 1 if device.type == "cpu" else 32  # reading a flag waits for a GPU; on a CPU it is free
    bar = progress(total=state.total_steps, initial=state.step, desc=f"epoch {epoch}", unit="step")
    while not state.finished and stop.signum is None:
        idx = state.batch()
        x = augment_batch(to_float(pool.take(idx), device), cfg.augment, state.aug_gen)
        y = pool.labels[idx].to(device, non_blocking=True)
        with autocast(device, job.amp_dtype):
            loss, logit = learner.loss(x, y, pool.class_weight)
        learner.optimizer.zero_grad(set_to_none=True)
        learner.scaler.scale(loss).backward()
        learner.scaler.unscale_(learner.optimizer)
        if learner.l2sp is not None:
            learner.l2sp.add_to_gradients()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # An active GradScaler owns fp16 overflow in the gradients; otherwise a non-finite gradient is ours to skip.
        loss_ok = torch.isfinite(loss)
        grad_ok = torch.ones_like(loss_ok) if learner.scaler.is_enabled() else torch.isfinite(grad_norm)
        optimizer_step(learner.optimizer, learner.scaler, loss_ok & grad_ok)
        if learner.ema is not None:  # after a skipped step the weights are unchanged, and so nearly is the EMA
            learner.ema.update_parameters(learner.model)
        state.add(loss, logit, loss_ok, grad_ok)
        learner.schedule.step()
        if state.step % check_every == 0:
            check_skipped_steps(job, epoch, state)
        bar.update(1)
    bar.close()
    check_skipped_steps(job, epoch, state)
    return state


def check_skipped_steps(job: Job, epoch: int, state: EpochState) -> None:
    """Warn about each skipped step since the last check; stop after --max_bad_steps in a row."""
    if not state.unchecked:
        return
    codes = torch.stack(state.unchecked).tolist()  # the one read of the device per check
    first = state.step - len(codes) + 1
    state.unchecked.clear()
    for step, code in enumerate(codes, start=first):
        if code == 0:
            job.bad_steps = 0
            continue
        job.bad_steps += 1
        what = "loss" if code == 1 else "gradient"
        log.warning("epoch %d step %d: non-finite %s, step skipped (%d in a row)", epoch, step, what, job.bad_steps)
        if job.bad_steps >= job.cfg.max_bad_steps:
            raise UserError(
                f"{job.bad_steps} consecutive training steps were non-finite (epoch {epoch}, step {step}): the "
                f"learning rate ({job.learner.schedule.lrs()}) is likely too high or the data broken; the best and "
                f"last good checkpoints in {job.run_dir} are intact"
            )


# --- the end of an epoch: evaluate, schedule, keep -----------------------------------------------


def end_epoch(job: Job, epoch: int, state: EpochState, *, seconds: float, started: float, reporter: Reporter) -> None:
    cfg, schedule, record, model = job.cfg, job.learner.schedule, job.record, job.learner.evaluated
    logits, labels = state.outputs(job.pool.labels)
    if job.sample_losses is not None:
        remember_sample_losses(job, state)
    if cfg.precise_bn:
        adapt_batchnorm(
            model,
            job.data.train,
            batch_size=cfg.batch_size,
            device=job.device,
            max_images=cfg.precise_bn,
            seed=cfg.seed + epoch,
        )
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
    threshold = _defined(metrics["val"]["best_threshold"]) if "val" in metrics else None
    saved = job.keeper.save_epoch(epoch, job.payload(epoch, metrics=metrics, score=f1, threshold=threshold))
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


def remember_sample_losses(job: Job, state: EpochState) -> None:
    """--hard_mining: each train sample's loss this epoch (margin-free BCE of its logit), for the next
    epoch's draw. Mixed-in samples (pool index >= len(train)) are not mined."""
    n = state.seen
    taken = state.taken[torch.arange(n, device=state.taken.device) // state.batch_size]
    order = state.order[:n][taken]
    logits = state.logits[:n][taken]
    labels = job.pool.labels[order].to(logits.device).float()
    losses = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    primary = order < len(job.sample_losses)
    job.sample_losses[order[primary].cpu()] = losses[primary].float().cpu()


def attach_finetuning(learner: Learner, cfg: TrainConfig, anchor: dict | None) -> None:
    """The weight EMA (--ema_decay) and the L2-SP anchor (--l2sp: the weights as they are now, the
    pretrained ones; on --resume, the anchor saved in the checkpoint)."""
    if cfg.ema_decay is not None:
        learner.ema = weight_ema(learner.model, cfg.ema_decay)
    if cfg.l2sp > 0:
        learner.l2sp = L2SP(learner.model, cfg.l2sp, anchor)
    if cfg.layer_decay < 1.0:
        log.info(
            "layer-wise LR decay %g: backbone LR x %s",
            cfg.layer_decay,
            describe_layer_decay(learner.model.backbone.unit_names(), cfg.layer_decay),
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


def resume_job(job: Job, raw: dict) -> tuple[int, dict | None]:
    """Restore weights, optimizer, schedule and record -> (the epoch to continue with, what
    train_one_epoch needs to continue an interrupted epoch, or None)."""
    job.learner.load_state_dict(raw)
    job.record = RunRecord.from_dict(raw)
    if job.sample_losses is not None and "sample_losses" in raw:
        job.sample_losses = raw["sample_losses"].clone()
    epoch, interrupted = raw["epoch"], "partial" in raw  # an interrupt may come before the epoch's first step
    stale = job.keeper.drop_after(epoch - 1 if interrupted else epoch)
    if stale:
        log.info("resume: removed checkpoints of epochs after the resumed one: %s", ", ".join(p.name for p in stale))
    return (epoch, {"partial": raw["partial"], "rng": raw["rng"]}) if interrupted else (epoch + 1, None)


def _defined(value) -> float | None:
    return float(value) if is_defined(value) else None
