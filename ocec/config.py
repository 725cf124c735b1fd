"""Configuration dataclasses: where defaults live, how values are validated and serialised.

`ModelConfig` is everything needed to rebuild a model (it travels inside every checkpoint);
`TrainConfig` is everything else a training run needs. Both convert to and from plain
dicts so checkpoints stay `weights_only=True`-safe.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields

from .errors import UserError

ARCH_VARIANTS = ("baseline", "inverted_se", "convnext")
HEAD_VARIANTS = ("auto", "avg", "avgmax_mlp")
MARGIN_METHODS = ("none", "arcface", "cosface")
AUTO_HEAD = {"baseline": "avg", "inverted_se": "avgmax_mlp", "convnext": "avgmax_mlp"}
MARGIN_DEFAULTS = {"cosface": (8.0, 0.35), "arcface": (8.0, 0.2), "none": (8.0, 0.0)}

# Settings that change what the weights mean: a pretrained checkpoint dictates them.
STRUCTURAL_FIELDS = ("arch_variant", "base_channels", "num_blocks", "head_variant", "image_size", "mean", "std")
MARGIN_FIELDS = ("margin_s", "margin_m")


def parse_image_size(text: str) -> tuple[int, int]:
    """'48' -> (48, 48); '32x64' -> (32, 64) (height x width)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", str(text))
    if not match:
        raise UserError(f"--image_size: expected N or HxW such as 32x64, got {text!r}")
    height = int(match.group(1))
    width = int(match.group(2)) if match.group(2) else height
    if not (8 <= height <= 1024 and 8 <= width <= 1024):
        raise UserError(f"--image_size: each side must be between 8 and 1024 pixels, got {height}x{width}")
    return height, width


@dataclass
class ModelConfig:
    arch_variant: str = "baseline"
    base_channels: int = 32
    num_blocks: int = 4
    head_variant: str = "auto"
    dropout: float = 0.3
    margin_method: str = "cosface"
    margin_s: float = 8.0
    margin_m: float = 0.35
    image_size: tuple[int, int] = (32, 64)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    expansion: int = 4
    se_reduction: int = 8

    def __post_init__(self) -> None:
        self.image_size = tuple(int(v) for v in self.image_size)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)

    @property
    def resolved_head(self) -> str:
        return AUTO_HEAD[self.arch_variant] if self.head_variant == "auto" else self.head_variant

    def validate(self) -> "ModelConfig":
        if self.arch_variant not in ARCH_VARIANTS:
            raise UserError(f"--arch_variant: {self.arch_variant!r} is not one of {', '.join(ARCH_VARIANTS)}")
        if self.head_variant not in HEAD_VARIANTS:
            raise UserError(f"--head_variant: {self.head_variant!r} is not one of {', '.join(HEAD_VARIANTS)}")
        if self.margin_method not in MARGIN_METHODS:
            raise UserError(f"--margin_method: {self.margin_method!r} is not one of {', '.join(MARGIN_METHODS)}")
        if not 1 <= self.base_channels <= 1024:
            raise UserError(f"--base_channels must be between 1 and 1024, got {self.base_channels}")
        if not 1 <= self.num_blocks <= 32:
            raise UserError(f"--num_blocks must be between 1 and 32, got {self.num_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.margin_method != "none" and not (self.margin_s > 0 and 0 <= self.margin_m < 1.5):
            raise UserError(
                f"--margin_s must be > 0 and --margin_m in [0, 1.5), got s={self.margin_s}, m={self.margin_m}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UserError(f"normalisation needs 3 means and 3 positive stds, got mean={self.mean} std={self.std}")
        parse_image_size(f"{self.image_size[0]}x{self.image_size[1]}")
        return self

    def to_dict(self) -> dict:
        out = asdict(self)
        out["image_size"] = list(self.image_size)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        out["head_variant"] = self.resolved_head  # checkpoints record what was built, never 'auto'
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Stage:
    """From `epoch` (1-based) on, the last `fraction` of backbone units train at `backbone_lr` (None: unchanged)."""

    epoch: int
    fraction: float
    backbone_lr: float | None = None


def parse_stages(text: str) -> list[Stage]:
    """Parse '--stages' such as '1:0:1e-4,11:0.5:3e-5,40:1' (epoch:unfrozen_fraction[:backbone_lr])."""
    stages: list[Stage] = []
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        pieces = part.split(":")
        try:
            if len(pieces) not in (2, 3):
                raise ValueError
            epoch, fraction = int(pieces[0]), float(pieces[1])
            lr = float(pieces[2]) if len(pieces) == 3 and pieces[2] else None
        except ValueError:
            raise UserError(f"--stages: {part!r} is not epoch:fraction[:backbone_lr], e.g. 11:0.5:3e-5") from None
        if epoch < 1:
            raise UserError(f"--stages: epoch must be >= 1 in {part!r}")
        if not 0.0 <= fraction <= 1.0:
            raise UserError(f"--stages: unfrozen fraction must be in [0, 1] in {part!r}")
        if lr is not None and not (lr > 0 and math.isfinite(lr)):
            raise UserError(f"--stages: backbone_lr must be a positive number in {part!r}")
        if stages and epoch <= stages[-1].epoch:
            raise UserError(f"--stages: epochs must increase, {part!r} comes after epoch {stages[-1].epoch}")
        if stages and fraction < stages[-1].fraction:
            raise UserError(f"--stages: the unfrozen fraction cannot shrink ({part!r} after {stages[-1].fraction})")
        stages.append(Stage(epoch, fraction, lr))
    if not stages:
        raise UserError("--stages: no stage given")
    return stages


@dataclass
class TrainConfig:
    data_root: str = ""
    output_dir: str = "runs/ocec"
    epochs: int = 100
    batch_size: int = 256
    num_workers: int = 4
    train_ratio: float = 0.8
    val_ratio: float = 0.1
    test_ratio: float = 0.1
    seed: int = 42
    device: str = "auto"
    use_amp: bool = False
    lr: float = 1e-3
    backbone_lr: float | None = None
    head_lr: float | None = None
    margin_lr: float | None = None
    weight_decay: float = 1e-4
    warmup_epochs: float = 3.0
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    plateau_metric: str = "val_loss"
    min_lr: float = 0.0
    grad_clip: float = 0.0
    augment: str = "default"
    balance: str = "pos_weight"
    keep_last: int = 10
    keep_best: int = 10
    cache_dir: str | None = None
    max_bad_fraction: float = 0.01
    max_bad_steps: int = 10
    pretrain: list[str] = field(default_factory=list)
    resume: str | None = None
    reinit_head: bool = False
    margin_init: str = "auto"
    freeze_backbone: bool = False
    unfreeze_backbone_epoch: int | None = None
    unfreeze_ratio: float = 1.0
    stage2_lr: float | None = None
    stages: str | None = None
    stage_warmup_epochs: float = 1.0
    mix_data_root: str | None = None
    mix_ratio: float = 0.0
    extra_val_root: str | None = None
    save_diagnostics: bool = False
    tensorboard: bool = False

    @property
    def group_lrs(self) -> dict[str, float]:
        """Base learning rate of each parameter group; each defaults to --lr."""
        return {
            "backbone": self.lr if self.backbone_lr is None else self.backbone_lr,
            "head": self.lr if self.head_lr is None else self.head_lr,
            "margin_head": self.lr if self.margin_lr is None else self.margin_lr,
        }

    def validate(self) -> "TrainConfig":
        positive_ints = {"--epochs": self.epochs, "--batch_size": self.batch_size}
        for flag, value in positive_ints.items():
            if value < 1:
                raise UserError(f"{flag} must be a positive integer, got {value}")
        if self.num_workers < 0:
            raise UserError(f"--num_workers must be >= 0, got {self.num_workers}")
        ratios = {"--train_ratio": self.train_ratio, "--val_ratio": self.val_ratio, "--test_ratio": self.test_ratio}
        for flag, value in ratios.items():
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{flag} must be in [0, 1], got {value}")
        if self.train_ratio <= 0:
            raise UserError("--train_ratio must be > 0")
        if sum(ratios.values()) > 1.0 + 1e-9:
            raise UserError(f"--train_ratio + --val_ratio + --test_ratio must be <= 1, got {sum(ratios.values()):g}")
        for flag, value in {
            "--lr": self.lr,
            "--backbone_lr": self.backbone_lr,
            "--head_lr": self.head_lr,
            "--margin_lr": self.margin_lr,
        }.items():
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise UserError(f"{flag} must be a positive number, got {value}")
        if self.weight_decay < 0:
            raise UserError(f"--weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_epochs < 0 or self.stage_warmup_epochs < 0:
            raise UserError("--warmup_epochs and --stage_warmup_epochs must be >= 0")
        if not 0.0 < self.plateau_factor < 1.0:
            raise UserError(f"--plateau_factor must be in (0, 1), got {self.plateau_factor}")
        if self.plateau_patience < 0:
            raise UserError(f"--plateau_patience must be >= 0, got {self.plateau_patience}")
        if self.min_lr < 0:
            raise UserError(f"--min_lr must be >= 0, got {self.min_lr}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise UserError(f"--max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.max_bad_steps < 1:
            raise UserError(f"--max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.keep_last < 1 or self.keep_best < 1:
            raise UserError("--keep_last and --keep_best must be >= 1")
        if not 0.0 <= self.mix_ratio < 1.0:
            raise UserError(f"--mix_ratio must be in [0, 1), got {self.mix_ratio}")
        if self.mix_ratio > 0 and not self.mix_data_root:
            raise UserError("--mix_ratio needs --mix_data_root (the dataset to mix in)")
        if self.mix_data_root and self.mix_ratio <= 0:
            raise UserError("--mix_data_root needs --mix_ratio > 0 (the share of each epoch drawn from it)")
        if self.grad_clip < 0:
            raise UserError(f"--grad_clip must be >= 0, got {self.grad_clip}")
        if self.stages and (self.freeze_backbone or self.unfreeze_backbone_epoch is not None):
            raise UserError("--stages replaces --freeze_backbone/--unfreeze_backbone_epoch: give one or the other")
        if self.unfreeze_backbone_epoch is not None and self.unfreeze_backbone_epoch < 1:
            raise UserError(f"--unfreeze_backbone_epoch must be >= 1, got {self.unfreeze_backbone_epoch}")
        if not 0.0 <= self.unfreeze_ratio <= 1.0:
            raise UserError(f"--unfreeze_ratio must be in [0, 1], got {self.unfreeze_ratio}")
        if self.stage2_lr is not None and not (self.stage2_lr > 0 and math.isfinite(self.stage2_lr)):
            raise UserError(f"--stage2_lr must be a positive number, got {self.stage2_lr}")
        if self.plateau_metric not in ("val_loss", "val_f1"):
            raise UserError(f"--plateau_metric must be val_loss or val_f1, got {self.plateau_metric}")
        self.stage_plan()
        return self

    def stage_plan(self) -> list[Stage]:
        """The freezing schedule: --stages, or the simple --freeze_backbone/--unfreeze_backbone_epoch form."""
        if self.stages:
            return parse_stages(self.stages)
        plan = []
        if self.freeze_backbone or self.unfreeze_backbone_epoch is not None:
            plan.append(Stage(1, 0.0, None))
        if self.unfreeze_backbone_epoch is not None:
            if self.unfreeze_backbone_epoch == 1:
                plan = []
            plan.append(Stage(self.unfreeze_backbone_epoch, self.unfreeze_ratio, self.stage2_lr))
        return plan

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def merge_pretrained_config(
    checkpoint: ModelConfig, given: ModelConfig, typed: set[str], flag: str = "--pretrain"
) -> ModelConfig:
    """Model config of a fine-tune: the checkpoint's structure, the user's typed non-structural choices.

    A structural flag typed with a value other than the checkpoint's is an error listing every mismatch,
    because silently building a different network would load the weights partially or not at all.
    """
    mismatches = []
    for name in STRUCTURAL_FIELDS:
        if name not in typed:
            continue
        ours, theirs = getattr(given, name), getattr(checkpoint, name)
        if name == "head_variant":  # compare what would be built, resolving 'auto' for the arch in use
            arch = given.arch_variant if "arch_variant" in typed else checkpoint.arch_variant
            ours = AUTO_HEAD[arch] if ours == "auto" else ours
            theirs = checkpoint.resolved_head
        if ours != theirs:
            mismatches.append(f"{name}: checkpoint={_show(theirs)}, given={_show(ours)}")
    margin_method = given.margin_method if "margin_method" in typed else checkpoint.margin_method
    same_method = margin_method == checkpoint.margin_method
    if same_method:
        for name in MARGIN_FIELDS:
            if name in typed and margin_method != "none" and getattr(given, name) != getattr(checkpoint, name):
                mismatches.append(f"{name}: checkpoint={getattr(checkpoint, name)}, given={getattr(given, name)}")
    if mismatches:
        raise UserError(
            f"{flag}: the checkpoint's architecture differs from the flags given: " + "; ".join(mismatches)
        )
    merged = ModelConfig.from_dict(checkpoint.to_dict())
    merged.margin_method = margin_method
    if "dropout" in typed:
        merged.dropout = given.dropout
    if not same_method:  # a new margin head: the user's (or the method's default) s and m apply
        default_s, default_m = MARGIN_DEFAULTS[margin_method]
        merged.margin_s = given.margin_s if "margin_s" in typed else default_s
        merged.margin_m = given.margin_m if "margin_m" in typed else default_m
    return merged.validate()


def _show(value) -> str:
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    return str(value)
