"""What a run starts from (fresh weights, `--pretrain` weights or a `--resume` checkpoint), and the
configs that follow from the settings given and that checkpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..core.config import ModelConfig, TrainConfig
from ..data.dataset import TrainingData
from ..engine.checkpoint import load_resumable
from ..finetune.pretrained import Snapshot, choose_best, load_pretrained
from ..models.model import OcecModel
from .settings import (
    describe_settings,
    finetune_settings,
    pretrained_model_config,
    resumed_configs,
    scratch_model_config,
    split_settings,
)

log = logging.getLogger("ocec")


@dataclass
class Start:
    cfg: TrainConfig
    model_cfg: ModelConfig
    snapshot: Snapshot | None = None  # --pretrain weights
    resume_path: Path | None = None  # --resume checkpoint, and its contents
    resume: dict | None = None
    filled: str = ""  # the fine-tuning defaults and recipe flags filled in for a --pretrain run


def plan_start(settings: dict) -> Start:
    """The run's configs: the settings given, merged with the checkpoint they start from."""
    given_train, given_model = split_settings(settings)
    filled = {}
    if given_train.get("pretrain") and not given_train.get("resume"):
        given_train, filled = finetune_settings(given_train)
        if filled:
            log.info("fine-tuning settings filled in (flags you give override them): %s", describe_settings(filled))
    cfg = TrainConfig(**given_train).validate()
    if cfg.resume:
        path, raw = load_resumable(cfg.resume)
        saved_train, saved_model = (
            TrainConfig.from_dict(raw["train_config"]),
            ModelConfig.from_dict(raw["model_config"]),
        )
        cfg, model_cfg, ignored = resumed_configs(saved_train, saved_model, given_train, given_model)
        if ignored:
            log.warning(
                "--resume: these flags are taken from the checkpoint, not the command line: %s", ", ".join(ignored)
            )
        step = f" step {raw['step']}" if "partial" in raw else ""
        log.info("resuming %s from epoch %d%s", path.parent, raw["epoch"], step)
        return Start(cfg, model_cfg.validate(), resume_path=path, resume=raw)
    if cfg.pretrain:
        snapshot, why = choose_best(cfg.pretrain)
        log.info("pretrain: chose %s", why)
        model_cfg = pretrained_model_config(snapshot.model_config, given_model)
        return Start(cfg, model_cfg, snapshot=snapshot, filled=describe_settings(filled))
    return Start(cfg, scratch_model_config(given_model))


def load_pretrained_weights(model: OcecModel, start: Start) -> dict | None:
    """Load --pretrain weights into `model`, log what was loaded; -> the load report (plain data)."""
    if start.snapshot is None:
        return None
    report = load_pretrained(model, start.snapshot, start.cfg.reinit_head, start.cfg.margin_init)
    log.info(report.line())
    return report.to_dict()


def selection_metric(data: TrainingData) -> str:
    """Best checkpoints are chosen by val F1; by train F1 without a val split; by val loss when the
    val split holds one class (F1 and ROC-AUC are undefined there)."""
    if data.val is None:
        return "train_f1"
    if len(data.val.labels.unique()) < 2:
        log.warning("data: the val split has only one class: F1 and ROC-AUC are undefined; selecting on val loss")
        return "val_loss"
    return "val_f1"


def describe_model(model: OcecModel) -> str:
    cfg = model.config
    return (
        f"model: {cfg.arch_variant} backbone, {cfg.resolved_head} head, {cfg.margin_method} margin head, "
        f"{cfg.num_blocks} blocks, {cfg.base_channels} base channels, "
        f"{sum(p.numel() for p in model.parameters())} parameters, image {cfg.image_size[0]}x{cfg.image_size[1]}"
    )
