"""Training: `train()` runs a whole job, `train_one_epoch()` one pass over the training data.

`train()` reads top to bottom: build the job (job.py: configs from the flags, `--pretrain` or `--resume`,
the data, the model and what updates it, the run folder), then for each epoch: enter its freezing stage,
train, evaluate, step the plateau schedule, keep checkpoints. Data is decoded once into uint8 tensors
(data.py); each step gathers a batch, converts and augments it on the device (no DataLoader, no
per-sample Python). Every random stream of epoch e is seeded from (seed, e) (sampling.py), so a
resumed run replays exactly what an uninterrupted run would have done. Under torchrun every process runs
this same loop on its shard of each global batch (distributed.py); one process of one is the same code.
"""

from __future__ import annotations

import logging
import time
from contextlib import closing
from pathlib import Path

import torch

from ..core.errors import Interrupted, UserError
from ..core.fileio import to_jsonable
from ..core.metrics import binary_report, is_defined
from ..core.progress import fmt, progress, quiet
from ..data.augment import augment_batch, blend_batch
from ..data.sampling import (
    AUGMENT_STREAM,
    DROPOUT_STREAM,
    ORDER_STREAM,
    epoch_generator,
    epoch_order,
    epoch_seed,
    to_float,
)
from ..engine import distributed
from ..engine.batchnorm import freeze_batchnorm_statistics, frozen_batchnorm, reestimate_as_trained
from ..engine.checkpoint import INTERRUPTED_NAME, epoch_name, save_checkpoint
from ..engine.distributed import (
    ONE_PROCESS,
    agreed_signal,
    all_agree,
    barrier,
    gather_objects,
    local_batchnorm,
    main_first,
    world_from_environment,
)
from ..engine.distributed import start as join_processes
from ..engine.epoch import EpochState
from ..engine.inference import eval_batch_size, evaluate_split
from ..engine.optim import count_trainable_units, enter_epoch_stage, optimizer_step
from ..engine.reporting import Reporter, epoch_line, epoch_row
from ..engine.rundir import removed_if_left_empty, run_log, write_history
from ..engine.runtime import StopFlag, autocast, stop_signals
from ..finetune.techniques import hard_weights
from .job import Job, build_job
from .start import plan_start

log = logging.getLogger("ocec")


def train(**settings) -> Path:
    """Run one training job and return its run folder. `settings` are `ocec train`'s flags by name
    (e.g. `data_root=`, `epochs=`, `pretrain=[...]`); unset ones take their defaults, or the values of
    the `--pretrain`/`--resume` checkpoint. Under torchrun each process runs this; they train one model."""
    world = world_from_environment()
    with quiet(not world.main), run_log() as attach_log, removed_if_left_empty() as created:
        try:
            # the main process alone reads --resume/--pretrain and hands the result to the others: another
            # machine may not hold the file (and one that fails must not leave the others waiting)
            join_processes(world, settings.get("device") or "auto")
            start = main_first(world, lambda: plan_start(settings), then_others=False)
            job, first_epoch, partial = build_job(start, world, attach_log, created)
            run_epochs(job, first_epoch, partial)
            job.learner.loss.distribute(ONE_PROCESS, job.device)  # DDP holds the process group: let it go first
            barrier(world)  # and no process leaves while another still talks to it (gloo aborted at exit)
        finally:
            distributed.stop()
        best = job.record.best
        log.info("done: best F1 %s at epoch %s (by %s) -> %s", fmt(best.f1), best.epoch, best.metric, best.path)
        return job.run_dir


def run_epochs(job: Job, first_epoch: int, partial: dict | None) -> None:
    """For each epoch: enter its freezing stage, train, evaluate, step the plateau schedule, keep checkpoints."""
    cfg, learner, world = job.cfg, job.learner, job.world
    trainable = None
    with stop_signals() as stop, closing(job.reporter()) as reporter:
        if job.record.pretrain is not None and not job.record.history and job.data.val is not None:
            start_as_candidate(job)
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
            now_trainable = [p.requires_grad for p in learner.model.parameters()]
            if now_trainable != trainable:  # DDP syncs the parameters that trained when it was built
                learner.loss.distribute(world, job.device)
                trainable = now_trainable
            started = time.time()
            state = train_one_epoch(job, epoch, stop, partial)
            partial = None
            if not state.finished:
                stop_run(job, agreed_signal(world, stop.signum, job.device), save_interrupted(job, epoch, state))
            end_epoch(job, epoch, state, seconds=time.time() - started, started=started, reporter=reporter)
            signum = agreed_signal(world, stop.signum, job.device)
            if signum is not None:
                stop_run(job, signum, job.run_dir / epoch_name(epoch))
    job.write_summary()


# --- one epoch -----------------------------------------------------------------------------------


def train_one_epoch(job: Job, epoch: int, stop: StopFlag, partial: dict | None = None) -> EpochState:
    """One pass over the epoch's seeded sample order; stops early (state.finished False) on a signal.
    `partial` (an interrupted epoch's saved state and generator states) continues it."""
    cfg, rank = job.cfg, job.world.rank
    order_gen = epoch_generator(cfg.seed, epoch, ORDER_STREAM)
    hard = None
    if job.sample_losses is not None and not torch.isnan(job.sample_losses).all():
        hard = (cfg.hard_mining, hard_weights(job.sample_losses))
    pool = job.pool
    order = epoch_order(
        pool.primary_labels, pool.mix_labels, cfg.mix_ratio, cfg.balance == "sampler", order_gen, hard=hard
    )
    aug_gen = epoch_generator(cfg.seed, epoch, AUGMENT_STREAM, job.device, rank=rank)
    state = EpochState(order.to(pool.device), cfg.batch_size, aug_gen, job.world)
    if partial is None:
        torch.manual_seed(epoch_seed(cfg.seed, epoch, DROPOUT_STREAM, rank=rank))
    else:
        torch.set_rng_state(partial["rng"]["torch"])
        aug_gen.set_state(partial["rng"]["aug"])
        state.load(partial["partial"])
    return continue_epoch(job, epoch, state, stop)


def continue_epoch(job: Job, epoch: int, state: EpochState, stop: StopFlag) -> EpochState:
    """The steps of an epoch from `state.step` on, until it ends or a stop signal reaches (every) rank."""
    cfg, pool, device, learner, world = job.cfg, job.pool, job.device, job.learner, job.world
    learner.model.train()
    freeze_batchnorm_statistics(learner.model)
    params = list(learner.model.parameters())
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    check_every = 1 if device.type == "cpu" else 32  # reading a flag waits for a GPU; on a CPU it is free
    bar = progress(total=state.total_steps, initial=state.step, desc=f"epoch {epoch}", unit="step")
    signum = agreed_signal(world, stop.signum, device)  # a signal may come before the first step
    while not state.finished and signum is None:
        idx = state.batch()
        x = augment_batch(to_float(pool.take(idx), device), cfg.augment, state.aug_gen)
        if cfg.kd_mixup:  # only with a teacher (TrainConfig.validate); off, it draws no random numbers
            x = blend_batch(x, cfg.kd_mixup, state.aug_gen)
        y = pool.labels[idx].to(device, non_blocking=True)
        soft = job.teacher.logits(x) if job.teacher is not None else None  # the very batch the student sees
        with autocast(device, job.amp_dtype):
            loss, logit = learner.loss(x, y, pool.class_weight, soft)
        learner.optimizer.zero_grad(set_to_none=True)
        learner.scaler.scale(loss).backward()
        learner.scaler.unscale_(learner.optimizer)
        if learner.l2sp is not None:
            learner.l2sp.add_to_gradients()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # An active GradScaler owns fp16 overflow in the gradients; otherwise a non-finite gradient is ours to skip.
        # Every rank takes or skips the step together: a non-finite loss on one rank skips it everywhere.
        loss_ok = torch.isfinite(loss)
        grad_ok = torch.ones_like(loss_ok) if learner.scaler.is_enabled() else torch.isfinite(grad_norm)
        loss_ok, grad_ok = all_agree(world, torch.stack([loss_ok, grad_ok]))
        optimizer_step(learner.optimizer, learner.scaler, loss_ok & grad_ok)
        if learner.ema is not None:  # after a skipped step the weights are unchanged, and so nearly is the EMA
            learner.ema.update_parameters(learner.model)
        state.add(loss, logit, loss_ok, grad_ok)
        learner.schedule.step()
        if state.step % check_every == 0:
            check_skipped_steps(job, epoch, state)
        if not world.distributed or state.step % check_every == 0:
            signum = agreed_signal(world, stop.signum, device)
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
    """Metrics over the whole epoch and validation split (the same on every rank, so are the decisions
    that follow); the main rank writes the checkpoints, history and summary."""
    cfg, schedule, record, model, world = job.cfg, job.learner.schedule, job.record, job.learner.evaluated, job.world
    state.combine_ranks()
    logits, labels = state.outputs(job.pool.labels)
    if job.sample_losses is not None:
        remember_sample_losses(job, state)
    job.average_buffers()
    precise_bn = precise_batchnorm(job, model, epoch) if cfg.precise_bn else None
    metrics = {"train": {"loss": state.mean_loss(), **binary_report(labels.numpy(), torch.sigmoid(logits).numpy())}}
    val_probs = None
    evaluate = dict(
        batch_size=eval_batch_size(cfg.batch_size, job.device), device=job.device, amp_dtype=job.amp_dtype, world=world
    )
    if job.data.val is not None:
        metrics["val"], val_probs = evaluate_split(model, job.data.val, **evaluate)
    if job.data.extra_val is not None:
        metrics["extra_val"], _ = evaluate_split(model, job.data.extra_val, desc="extra_val", **evaluate)
    source = metrics["val" if "val" in metrics else "train"]
    lrs = schedule.lrs()
    reduced = schedule.end_epoch(source["loss" if cfg.plateau_metric == "val_loss" else "f1"])
    row = epoch_row(epoch, metrics, lrs, seconds=seconds, wall_seconds=time.time() - started, seen=state.seen)
    row["trainable_backbone_units"] = count_trainable_units(job.learner.model)  # not the EMA copy
    first = all(r["epoch"] == 0 for r in record.history)  # the run's first trained epoch: say what things cost
    if job.teacher is not None:
        row["teacher_seconds"] = round(job.teacher.take_seconds(), 3)
        if first:
            log.info("teacher: %.1fs of this epoch's %.1fs of training", row["teacher_seconds"], seconds)
    if precise_bn is not None:
        row["precise_bn_seconds"] = round(precise_bn[1], 3)
        if first and not precise_bn[0]:
            log.info("precise BN: nothing to re-estimate (the model has no BatchNorm layers)")
        elif first:
            log.info(
                "precise BN: BatchNorm statistics re-estimated on %d training images before validating "
                "(%.1fs, %.0f%% of the epoch; --precise_bn 0 turns it off)",
                precise_bn[0],
                precise_bn[1],
                100 * precise_bn[1] / max(row["wall_seconds"], 1e-9),
            )
    record.history.append(to_jsonable(row))

    f1, score, tiebreak = _defined(source["f1"]), row[record.best.metric], _defined(source.get("best_f1"))
    better = record.best.after(epoch, score, f1, tiebreak, job.run_dir)
    improved = better is not None
    record.best = better or record.best
    if world.main:
        threshold = _defined(metrics["val"]["best_threshold"]) if "val" in metrics else None
        saved = job.keeper.save_epoch(epoch, job.payload(epoch, metrics=metrics, score=f1, threshold=threshold))
        if improved:
            job.keeper.copy_to_best(saved, Path(record.best.path).name)
        (job.run_dir / INTERRUPTED_NAME).unlink(missing_ok=True)
        write_history(job.run_dir, record.history)
        job.write_summary()
        reporter.epoch_end(row, job.data.val.labels.numpy() if job.data.val is not None else None, val_probs)
    log.info(epoch_line(row, cfg.epochs, improved))
    if improved and record.best.by_tiebreak():
        log.info(
            "best: F1 at 0.5 is 0 in every epoch so far (all predicted closed): kept the epoch with the best "
            "F1 at the best threshold (%s) until an epoch has F1 > 0 at 0.5",
            fmt(tiebreak),
        )
    if reduced:
        log.info(
            "plateau: %s did not improve for %d epoch(s); learning rates x%g (floor %g) -> %s",
            cfg.plateau_metric,
            cfg.plateau_patience + 1,
            cfg.plateau_factor,
            cfg.min_lr,
            ", ".join(f"{g} {v:.2e}" for g, v in schedule.lrs().items()),
        )


def start_as_candidate(job: Job) -> None:
    """Epoch 0 of a --pretrain run: the starting weights (after --bn_adapt) validated and, as the first best
    candidate, saved, so a run never ends with a best checkpoint worse than the model it started from."""
    record, world = job.record, job.world
    evaluate = dict(batch_size=eval_batch_size(job.cfg.batch_size, job.device), device=job.device, world=world)
    model, metrics = job.learner.evaluated, {}
    metrics["val"], _ = evaluate_split(model, job.data.val, amp_dtype=job.amp_dtype, **evaluate)
    if job.data.extra_val is not None:
        metrics["extra_val"], _ = evaluate_split(model, job.data.extra_val, amp_dtype=job.amp_dtype, **evaluate)
    row = {"epoch": 0, **{f"{split}_{k}": v for split, values in metrics.items() for k, v in values.items()}}
    record.history.append(to_jsonable(row))
    f1 = _defined(row["val_f1"])
    better = record.best.after(0, row.get(record.best.metric), f1, _defined(row.get("val_best_f1")), job.run_dir)
    if better is not None:
        record.best = better
        if world.main:
            threshold = _defined(metrics["val"]["best_threshold"])
            job.keeper.save_best(Path(better.path).name, job.payload(0, metrics=metrics, score=f1, threshold=threshold))
    if world.main:
        write_history(job.run_dir, record.history)
    log.info(
        "epoch 0 (the --pretrain start%s): val loss %s f1 %s auc %s: the first best candidate",
        ", BatchNorm adapted" if job.cfg.bn_adapt else "",
        fmt(row["val_loss"]),
        fmt(row["val_f1"]),
        fmt(row["val_roc_auc"], 3),
    )


def remember_sample_losses(job: Job, state: EpochState) -> None:
    """--hard_mining: each train sample's loss this epoch (margin-free BCE of its logit), for the next
    epoch's draw. Mixed-in samples (pool index >= len(train)) are not mined."""
    order, logits = state.taken_samples()
    labels = job.pool.labels[order].to(logits.device).float()
    losses = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    primary = order < len(job.sample_losses)
    job.sample_losses[order[primary].cpu()] = losses[primary].float().cpu()


# --- stopping -------------------------------------------------------------------------------------


def save_interrupted(job: Job, epoch: int, state: EpochState) -> Path:
    """The stopped epoch's state, with each rank's generator states (a list under torchrun)."""
    state.combine_ranks()
    job.average_buffers()  # linear, as the running statistics' updates: averaging now or at the epoch's end agree
    rng = gather_objects(job.world, {"torch": torch.get_rng_state(), "aug": state.aug_gen.get_state()})
    path = job.run_dir / INTERRUPTED_NAME
    if job.world.main:
        extra = {"partial": state.to_dict(), "rng": rng if job.world.distributed else rng[0]}
        save_checkpoint(path, job.payload(epoch, step=state.step, extra=extra))
    barrier(job.world)  # torchrun stops the other processes when one exits: not before the checkpoint is written
    return path


def stop_run(job: Job, signum: int, checkpoint: Path):
    log.warning("stopped; resume with: python -m ocec train --resume %s", job.run_dir)
    raise Interrupted(signum, checkpoint)


def precise_batchnorm(job: Job, model, epoch: int) -> tuple[int, float]:
    """Re-estimate the judged weights' BatchNorm statistics on a seeded sample of training images, so that
    validation, the best checkpoint and its threshold see statistics that match the weights (the running
    ones trail weights that change fast, which early on shifts every embedding to one side: F1 0 at 0.5).
    The saved checkpoint holds these statistics, so `ocec eval` reproduces the logged F1. -> (images, s)"""
    started = time.perf_counter()
    # every rank re-estimates on the same images (identical statistics)
    with local_batchnorm():
        images = reestimate_as_trained(
            model,
            job.data.train,
            augment_level=job.cfg.augment,
            seed=job.cfg.seed + epoch,
            max_images=job.cfg.precise_bn,
            batch_size=job.cfg.batch_size,
            device=job.device,
            amp_dtype=job.amp_dtype,
            keep=frozen_batchnorm(job.learner.model),  # by the trained model's names: the EMA copy has the same
        )
    return images, time.perf_counter() - started


def _defined(value) -> float | None:
    return float(value) if is_defined(value) else None
