"""Settings that are valid but would do nothing in this run: warned about once, at its start (a flag that
silently does nothing costs a user a training run to find out)."""

from __future__ import annotations

from ..core.config import TrainConfig, format_stage


def ineffective_settings(cfg: TrainConfig) -> list[str]:
    """One line per setting that this run's other settings make useless."""
    notes = []
    plan = cfg.stage_plan()
    if cfg.stages is None and cfg.unfreeze_backbone_epoch is not None and cfg.unfreeze_backbone_epoch > cfg.epochs:
        notes.append(
            f"--unfreeze_backbone_epoch {cfg.unfreeze_backbone_epoch} is after the last epoch "
            f"(--epochs {cfg.epochs}): the backbone stays frozen for the whole run"
        )
    late = [s for s in cfg.stages or [] if s.epoch > cfg.epochs]
    if late:
        shown = ", ".join(format_stage(s) for s in late)
        notes.append(
            f"--stages: {len(late)} of {len(cfg.stages)} stages begin after the last epoch (--epochs {cfg.epochs}) "
            f"and never run: {shown}"
        )
    reached = [s for s in plan if s.epoch <= cfg.epochs]
    frozen_throughout = bool(plan) and all(s.fraction == 0 for s in reached)
    for flag, used in (("--layer_decay", cfg.layer_decay < 1.0), ("--l2sp", cfg.l2sp > 0)):
        if used and frozen_throughout:
            notes.append(f"{flag} acts on the backbone, which is frozen for the whole run: it changes nothing")
    if cfg.hard_mining > 0 and cfg.epochs < 2:
        notes.append("--hard_mining draws by the previous epoch's losses: with --epochs 1 there is none")
    return notes
