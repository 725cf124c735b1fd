"""A training job's parts (configs, model and what updates it, data, run folder, record) and how they are
built: from fresh weights, `--pretrain` weights or a `--resume` checkpoint, in one process or one of
several under torchrun (only the main process writes)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.config import ModelConfig, TrainConfig
from ..core.errors import UserError
from ..core.fileio import remove_stale_temporaries, write_json_atomic
from ..core.version import __version__
from ..data.dataset import TrainingData, load_training_data
from ..data.sampling import TrainingPool, steps_per_epoch
from ..engine.checkpoint import Best, CheckpointKeeper, RunRecord, training_payload
from ..core.errors import PeerFailed
from ..engine.distributed import (
    ONE_PROCESS,
    World,
    average_buffers,
    gather_objects,
    machine_first,
    main_first,
    sync_batchnorm,
)
from ..engine.distributed import start as join_processes
from ..engine.optim import Learner, describe_layer_decay
from ..engine.reporting import Reporter, check_optional
from ..engine.rundir import check_writable, next_run_dir, write_summary
from ..engine.runtime import amp_dtype, keep_freed_memory, resolve_device
from ..finetune.distill import Teacher, read_teachers
from ..finetune.techniques import L2SP, weight_ema, zero_shot_report
from .checks import ineffective_settings
from .start import Start, describe_model, load_pretrained_weights, selection_metric

log = logging.getLogger("ocec")


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
    world: World = ONE_PROCESS
    record: RunRecord | None = None
    bad_steps: int = 0  # consecutive non-finite steps
    sample_losses: torch.Tensor | None = None  # --hard_mining: each train sample's last loss (NaN: not yet seen)
    teacher: Teacher | None = None  # --teacher

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

    def average_buffers(self) -> None:
        """The BatchNorm statistics of the model (and EMA) averaged over the ranks, before they are validated
        or saved."""
        average_buffers(self.world, self.learner.model)
        if self.learner.ema is not None:
            average_buffers(self.world, self.learner.ema.module)

    def reporter(self) -> Reporter:
        main = self.world.main
        return Reporter(self.run_dir, self.cfg.tensorboard and main, self.cfg.save_diagnostics and main)

    def write_summary(self) -> None:
        if self.world.main:
            record = self.record
            best = record.best.to_dict()
            write_summary(
                self.run_dir, record.history, best, epochs=self.cfg.epochs, pretrain=record.pretrain, device=self.device
            )


def check_same_data(world: World, data: TrainingData, cfg) -> None:
    """Every machine reads its own copy of the data: a copy that differs would train each rank on other
    rows under one seed's order. Refused on every process at once (the main one says why)."""
    prints = gather_objects(world, data.fingerprint())
    differs = [rank for rank, seen in enumerate(prints) if seen != prints[0]]
    if differs and world.main:
        raise UserError(
            f"--data_root {cfg.data_root}: process {differs[0]} (another machine?) read other data "
            f"(rows and open labels per split {prints[differs[0]]}, here {prints[0]}): "
            "give every machine the same files"
        )
    if differs:
        raise PeerFailed("the main process refused the data")


def build_job(start: Start, world: World, attach_log, created: list) -> tuple[Job, int, dict | None]:
    """Everything a run needs -> (the job, the first epoch, an interrupted epoch's state or None)."""
    cfg, model_cfg = start.cfg, start.model_cfg
    check_optional(cfg.tensorboard, cfg.save_diagnostics)
    if world.distributed and cfg.batch_size % world.size:
        raise UserError(
            f"--batch_size {cfg.batch_size} is the global batch: it must divide among {world.size} processes"
        )
    device = resolve_device(join_processes(world, cfg.device))
    if device.type == "cpu":
        keep_freed_memory()
    folder, flag = (start.resume_path.parent, "--resume") if start.resume else (cfg.output_dir, "--output_dir")
    output_dir = main_first(world, lambda: check_writable(folder, flag, created=created), then_others=False)
    # the main process reads, decodes and caches first, then the first process of each other machine
    # (its own cache, or a check of a shared one); the others then memory-map their machine's cache
    data = machine_first(world, lambda first: load_training_data(cfg, model_cfg.image_size, verify_cache=first))
    check_same_data(world, data, cfg)
    primary = [data.train] + ([data.extra_train] if data.extra_train is not None else [])
    steps = steps_per_epoch(sum(len(split) for split in primary), cfg.batch_size, world.size)

    torch.manual_seed(cfg.seed)
    learner = Learner.build(model_cfg, cfg, steps, device)
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
            world=world,
        )
    if world.distributed and cfg.sync_bn:
        sync_batchnorm(learner.model, device)
    attach_finetuning(learner, cfg, anchor=(start.resume or {}).get("l2sp_anchor"))
    pool = TrainingPool.build(primary, data.mix, mix_ratio=cfg.mix_ratio, balance=cfg.balance, device=device)

    def open_run_dir() -> Path:
        run_dir = output_dir if start.resume else next_run_dir(output_dir, created)
        attach_log(run_dir)
        remove_stale_temporaries(run_dir)
        return run_dir

    run_dir = main_first(world, open_run_dir, then_others=False)
    job = Job(cfg, model_cfg, learner, pool, data, device, amp_dtype(device, cfg.use_amp), run_dir, world)
    if cfg.hard_mining > 0:
        job.sample_losses = torch.full((pool.primary,), float("nan"))
    if cfg.teacher:  # read by the main process (another machine may lack the files), built on every rank
        snaps = main_first(world, lambda: read_teachers(cfg.teacher), then_others=False)
        job.teacher = Teacher(snaps, device, job.amp_dtype)
        log.info("%s; --kd_alpha %g --kd_temperature %g", job.teacher.describe(), cfg.kd_alpha, cfg.kd_temperature)
    job.record = RunRecord([], Best(selection_metric(data)), pretrain)
    if world.distributed:
        log.info(
            "torchrun: %d processes on %s, global batch %d (%d each)%s",
            world.size,
            device.type,
            cfg.batch_size,
            cfg.batch_size // world.size,
            ", SyncBatchNorm" if cfg.sync_bn else "",
        )
    for note in ineffective_settings(cfg) if world.main else []:
        log.warning("warning: %s", note)
    if start.resume:
        first_epoch, partial = resume_job(job, start.resume)
        return job, first_epoch, partial
    if world.main:
        log.info("run folder: %s", run_dir)
        meta = {"pretrain": pretrain, "filled_in": start.filled, "device": str(device), "ocec_version": __version__}
        meta["processes"] = world.size
        write_json_atomic(run_dir / "config.json", {"model": model_cfg.to_dict(), "train": cfg.to_dict(), **meta})
    return job, 1, None


def attach_finetuning(learner: Learner, cfg: TrainConfig, anchor: dict | None) -> None:
    """The weight EMA (--ema_decay) and the L2-SP anchor (--l2sp: the weights as they are now, the
    pretrained ones; on --resume, the anchor saved in the checkpoint)."""
    if cfg.ema_decay is not None:
        learner.ema = weight_ema(learner.model, cfg.ema_decay)
    if cfg.l2sp > 0:
        learner.l2sp = L2SP(learner.model, cfg.l2sp, anchor)
    if cfg.layer_decay < 1.0:
        units = learner.model.backbone.unit_names()
        log.info(
            "layer-wise LR decay %g: backbone LR x %s", cfg.layer_decay, describe_layer_decay(units, cfg.layer_decay)
        )


def resume_job(job: Job, raw: dict) -> tuple[int, dict | None]:
    """Restore weights, optimizer, schedule and record -> (the epoch to continue with, what
    train_one_epoch needs to continue an interrupted epoch, or None)."""
    job.learner.load_state_dict(raw)
    job.record = RunRecord.from_dict(raw)
    if job.sample_losses is not None and "sample_losses" in raw:
        if len(raw["sample_losses"]) == len(job.sample_losses):
            job.sample_losses = raw["sample_losses"].clone()
        else:  # --data_root (or --extra_train_root) changed: the losses belong to other samples
            log.warning(
                "resume: the saved per-sample losses are of %d training samples, this data has %d: hard-example "
                "mining starts afresh (uniform until the next epoch's losses)",
                len(raw["sample_losses"]),
                len(job.sample_losses),
            )
    epoch, interrupted = raw["epoch"], "partial" in raw  # an interrupt may come before the epoch's first step
    if job.world.main:
        stale = job.keeper.drop_after(epoch - 1 if interrupted else epoch)
        if stale:
            log.info(
                "resume: removed checkpoints of epochs after the resumed one: %s", ", ".join(p.name for p in stale)
            )
    if not interrupted:
        return epoch + 1, None
    rng = raw["rng"]
    if isinstance(rng, list):  # saved by several processes: one generator state each
        if len(rng) != job.world.size:
            raise UserError(
                f"--resume: {len(rng)} processes were stopped mid-epoch; resume with as many, "
                "or from an epoch checkpoint"
            )
        rng = rng[job.world.rank]
    elif job.world.distributed:
        raise UserError("--resume: one process was stopped mid-epoch; resume with one, or from an epoch checkpoint")
    return epoch, {"partial": raw["partial"], "rng": rng}
