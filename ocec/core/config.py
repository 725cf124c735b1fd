"""Configuration dataclasses: where every default lives, how values are validated and serialised.
(How a run's settings merge with defaults and checkpoints is in settings.py.) No torch here: the CLI
and the decode/synth worker processes import this module, and should start fast and small.

`ModelConfig` is everything needed to rebuild a model (it travels inside every checkpoint);
`TrainConfig` is everything else a training run needs. Both convert to and from plain dicts so
checkpoints stay `weights_only=True`-safe. "Settings" are what a caller set explicitly (the CLI's
parsed flags, or `train(**settings)`): unset fields take the defaults here, or a checkpoint's values.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields

from .architecture import (  # noqa: F401 - re-exported: the flags and the model read them here
    ARCH_VARIANTS,
    AUTO_HEAD,
    HEAD_VARIANTS,
    TOKEN_MIXER_HEADS,
    check_feature_map,
    feature_map_size,
    parse_grid,
    upgrade_model_config,
)
from .errors import UserError

MARGIN_METHODS = ("none", "arcface", "cosface")
MARGIN_DEFAULTS = {"cosface": (8.0, 0.35), "arcface": (8.0, 0.2), "none": (8.0, 0.0)}  # (scale s, margin m)
PLATEAU_METRICS = ("val_loss", "val_f1")
AUGMENT_LEVELS = ("none", "light", "default", "shift")  # strengths in augment.py
UNFREEZE_SIDES = ("output", "input")
RECIPES = ("full", "lp-ft", "surgical", "progressive")
DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N"
BALANCE_MODES = ("none", "pos_weight", "sampler")
MARGIN_INITS = ("auto", "random", "from_linear")


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
    margin_s: float | None = None  # None: the method's default (MARGIN_DEFAULTS)
    margin_m: float | None = None
    image_size: tuple[int, int] = (32, 64)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    expansion: int = 4
    se_reduction: int = 8
    token_mixer_grid: tuple[int, int] = (2, 3)  # transformer/mlp_mixer heads: tokens pooled onto HxW cells
    token_mixer_layers: int = 2
    mlp_hidden: int | None = None  # avgmax_mlp's hidden width; None: max(16, channels) as upstream

    def __post_init__(self) -> None:
        self.token_mixer_grid = tuple(int(v) for v in self.token_mixer_grid)
        self.image_size = tuple(int(v) for v in self.image_size)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        default_s, default_m = MARGIN_DEFAULTS.get(self.margin_method, MARGIN_DEFAULTS["cosface"])
        self.margin_s = default_s if self.margin_s is None else float(self.margin_s)
        self.margin_m = default_m if self.margin_m is None else float(self.margin_m)

    @property
    def resolved_head(self) -> str:
        return AUTO_HEAD[self.arch_variant] if self.head_variant == "auto" else self.head_variant

    def validate(self) -> "ModelConfig":
        _choice("--arch_variant", self.arch_variant, ARCH_VARIANTS)
        _choice("--head_variant", self.head_variant, HEAD_VARIANTS)
        _choice("--margin_method", self.margin_method, MARGIN_METHODS)
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
        check_feature_map(
            self.arch_variant,
            self.image_size,
            self.num_blocks,
            self.resolved_head,
            self.token_mixer_grid,
            self.token_mixer_layers,
        )
        return self

    def to_dict(self) -> dict:
        out = asdict(self)
        out["image_size"] = list(self.image_size)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        out["token_mixer_grid"] = list(self.token_mixer_grid)
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


def format_stage(stage: Stage) -> str:
    """Stage(11, 0.5, 3e-5) -> '11:0.5:3e-05', the form --stages reads back."""
    return f"{stage.epoch}:{stage.fraction:g}" + (f":{stage.backbone_lr:g}" if stage.backbone_lr else "")


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
        if lr is not None and not _positive(lr):
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
    compile: bool = False
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm)
    lr: float = 1e-3
    backbone_lr: float | None = None  # None: --lr (likewise head_lr, margin_lr)
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
    cache_dir: str | None = None  # None: $OCEC_CACHE_DIR or ~/.cache/ocec
    no_cache: bool = False
    max_bad_fraction: float = 0.01
    max_bad_steps: int = 10
    pretrain: list[str] = field(default_factory=list)
    resume: str | None = None
    reinit_head: bool = False
    margin_init: str = "auto"
    freeze_backbone: bool = False
    unfreeze_backbone_epoch: int | None = None
    unfreeze_ratio: float | None = None  # None: 1.0 (only with --unfreeze_backbone_epoch)
    stage2_lr: float | None = None
    stages: list[Stage] | None = None
    stage_warmup_epochs: float = 1.0
    unfreeze_from: str = "output"  # stages release backbone units from the output side, or the input side
    bn_adapt: bool = False  # re-estimate BatchNorm statistics on the training images after --pretrain loads
    # images (augmented as in training) to re-estimate BatchNorm statistics on before each validation (0: off).
    # 2000: measured by bench/precise_bn.py, val F1 at 0.5 no longer improves beyond 256-1000 images on two
    # synthetic shifts, and real crops (558 train images) use them all; at 400k images it is ~0.2% of an epoch.
    precise_bn: int = 2000
    ema_decay: float | None = None  # keep an exponential moving average of the weights, validated and kept
    l2sp: float = 0.0  # pull the backbone towards the pretrained weights (instead of weight decay towards 0)
    layer_decay: float = 1.0  # backbone LR x layer_decay^k for the k-th unit counted from the output side
    hard_mining: float = 0.0  # share of each epoch drawn in proportion to the previous epoch's loss
    recipe: str | None = None  # a named fine-tuning recipe (RECIPES), expanded into the flags above
    mix_data_root: str | None = None
    mix_ratio: float = 0.0
    extra_val_root: str | None = None
    extra_train_root: str | None = None  # its train split is added to every epoch (e.g. pseudo-labelled rows)
    teacher: list[str] = field(default_factory=list)  # distillation: checkpoints/runs whose logits are averaged
    kd_alpha: float = 0.5  # weight of the distillation term (the margin loss gets 1 - kd_alpha)
    kd_temperature: float = 2.0
    kd_mixup: float = 0.0  # with a teacher: blend each image with another, the other weighted U(0, kd_mixup)
    exclude: str | None = None  # rows of --data_root to drop, by image_path (e.g. ocec audit's label_issues.csv)
    exclude_top: int | None = None  # only the first N rows --exclude lists (by its rank column)
    relabel: str | None = None  # rows of --data_root whose label is flipped, by image_path
    split_codes: str | None = None  # a .npy of per-row split codes replacing the split column (ocec audit)
    save_diagnostics: bool = False
    tensorboard: bool = False

    def __post_init__(self) -> None:
        self.pretrain = [str(p) for p in (self.pretrain or [])]
        self.teacher = [str(p) for p in (self.teacher or [])]
        if isinstance(self.stages, str):
            self.stages = parse_stages(self.stages)

    @property
    def group_lrs(self) -> dict[str, float]:
        """Base learning rate of each parameter group; each defaults to --lr."""
        return {
            "backbone": self.lr if self.backbone_lr is None else self.backbone_lr,
            "head": self.lr if self.head_lr is None else self.head_lr,
            "margin_head": self.lr if self.margin_lr is None else self.margin_lr,
        }

    def validate(self) -> "TrainConfig":
        """Every check of a single flag and between flags, so each way of starting a run gets them."""
        if self.pretrain and self.resume:
            raise UserError(
                "--pretrain and --resume exclude each other (--resume continues a run with its own weights)"
            )
        if not self.data_root and not self.resume:
            raise UserError("--data_root is required (unless --resume)")
        if not 0.0 < self.kd_alpha <= 1.0 or not self.kd_temperature > 0:
            raise UserError(
                f"--kd_alpha must be in (0, 1] and --kd_temperature > 0, got {self.kd_alpha}, {self.kd_temperature}"
            )
        if not 0.0 <= self.kd_mixup <= 0.5:
            raise UserError(f"--kd_mixup must be in [0, 0.5] (the blended-in image's top weight), got {self.kd_mixup}")
        if self.kd_mixup and not self.teacher:
            raise UserError("--kd_mixup blends images for distillation: it needs --teacher")
        if self.exclude_top is not None and (self.exclude_top < 1 or not self.exclude):
            raise UserError(f"--exclude_top must be >= 1 and needs --exclude FILE, got {self.exclude_top}")
        if self.epochs < 1:
            raise UserError(f"--epochs must be a positive integer, got {self.epochs}")
        if self.batch_size < 2:
            raise UserError(f"--batch_size must be an integer >= 2 (BatchNorm needs two images), got {self.batch_size}")
        if self.num_workers < 0:
            raise UserError(f"--num_workers must be >= 0, got {self.num_workers}")
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")
        ratios = {"--train_ratio": self.train_ratio, "--val_ratio": self.val_ratio, "--test_ratio": self.test_ratio}
        for flag, value in ratios.items():
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{flag} must be in [0, 1], got {value}")
        if self.train_ratio <= 0:
            raise UserError("--train_ratio must be > 0")
        if sum(ratios.values()) > 1.0 + 1e-9:
            raise UserError(f"--train_ratio + --val_ratio + --test_ratio must be <= 1, got {sum(ratios.values()):g}")
        rates = {"--lr": self.lr, "--backbone_lr": self.backbone_lr, "--head_lr": self.head_lr}
        rates.update({"--margin_lr": self.margin_lr, "--stage2_lr": self.stage2_lr})
        for flag, value in rates.items():
            if value is not None and not _positive(value):
                raise UserError(f"{flag} must be a positive number, got {value}")
        _at_least("--weight_decay", self.weight_decay, 0)
        _at_least("--warmup_epochs", self.warmup_epochs, 0)
        _at_least("--stage_warmup_epochs", self.stage_warmup_epochs, 0)
        _at_least("--plateau_patience", self.plateau_patience, 0)
        _at_least("--min_lr", self.min_lr, 0)
        _at_least("--grad_clip", self.grad_clip, 0)
        _at_least("--max_bad_steps", self.max_bad_steps, 1)
        _at_least("--keep_last", self.keep_last, 1)
        _at_least("--keep_best", self.keep_best, 1)
        if not 0.0 < self.plateau_factor < 1.0:
            raise UserError(f"--plateau_factor must be in (0, 1), got {self.plateau_factor}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise UserError(f"--max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        _choice("--plateau_metric", self.plateau_metric, PLATEAU_METRICS)
        _choice("--augment", self.augment, AUGMENT_LEVELS)
        _choice("--balance", self.balance, BALANCE_MODES)
        _choice("--margin_init", self.margin_init, MARGIN_INITS)
        self._validate_mixing()
        self._validate_stages()
        self._validate_finetuning()
        if not self.pretrain:
            for flag, used in (("--reinit_head", self.reinit_head), ("--margin_init", self.margin_init != "auto")):
                if used:
                    raise UserError(f"{flag} applies to --pretrain weights; without --pretrain it would do nothing")
        if self.reinit_head and self.margin_init == "from_linear":
            raise UserError("--margin_init from_linear needs the pretrained head; --reinit_head discards it")
        return self

    def _validate_mixing(self) -> None:
        if not 0.0 <= self.mix_ratio < 1.0:
            raise UserError(f"--mix_ratio must be in [0, 1), got {self.mix_ratio}")
        if self.mix_ratio > 0 and not self.mix_data_root:
            raise UserError("--mix_ratio needs --mix_data_root (the dataset to mix in)")
        if self.mix_data_root and self.mix_ratio <= 0:
            raise UserError("--mix_data_root needs --mix_ratio > 0 (the share of each epoch drawn from it)")

    def _validate_finetuning(self) -> None:
        _choice("--unfreeze_from", self.unfreeze_from, UNFREEZE_SIDES)
        _at_least("--precise_bn", self.precise_bn, 0)
        _at_least("--l2sp", self.l2sp, 0)
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise UserError(f"--ema_decay must be in (0, 1), e.g. 0.999, got {self.ema_decay}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise UserError(f"--layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0.0 <= self.hard_mining < 1.0:
            raise UserError(f"--hard_mining must be in [0, 1), got {self.hard_mining}")
        if self.recipe is not None:
            _choice("--recipe", self.recipe, tuple(RECIPES))
        needs_weights = {"--bn_adapt": self.bn_adapt, "--l2sp": self.l2sp > 0, "--recipe": self.recipe is not None}
        for flag, used in needs_weights.items():
            if used and not self.pretrain:
                raise UserError(f"{flag} applies to --pretrain weights; without --pretrain there are none")

    def _validate_stages(self) -> None:
        if self.unfreeze_from != "output" and not self.stage_plan():
            raise UserError(
                f"--unfreeze_from {self.unfreeze_from} applies to freezing stages (--stages, a --recipe with stages, "
                "--freeze_backbone); without them the whole backbone trains from the first step"
            )
        if self.stages is not None and (self.freeze_backbone or self.unfreeze_backbone_epoch is not None):
            raise UserError("--stages replaces --freeze_backbone/--unfreeze_backbone_epoch: give one or the other")
        if self.unfreeze_backbone_epoch is None:
            for flag, value in (("--unfreeze_ratio", self.unfreeze_ratio), ("--stage2_lr", self.stage2_lr)):
                if value is not None:
                    raise UserError(f"{flag} applies from --unfreeze_backbone_epoch on, which is not set")
        elif self.unfreeze_backbone_epoch < 1:
            raise UserError(f"--unfreeze_backbone_epoch must be >= 1, got {self.unfreeze_backbone_epoch}")
        if self.unfreeze_ratio is not None and not 0.0 <= self.unfreeze_ratio <= 1.0:
            raise UserError(f"--unfreeze_ratio must be in [0, 1], got {self.unfreeze_ratio}")

    def stage_plan(self) -> list[Stage]:
        """The freezing schedule: --stages, or the simple --freeze_backbone/--unfreeze_backbone_epoch form."""
        if self.stages is not None:
            return list(self.stages)
        epoch, plan = self.unfreeze_backbone_epoch, []
        if (self.freeze_backbone or epoch is not None) and epoch != 1:
            plan.append(Stage(1, 0.0, None))
        if epoch is not None:
            plan.append(Stage(epoch, 1.0 if self.unfreeze_ratio is None else self.unfreeze_ratio, self.stage2_lr))
        return plan

    def to_dict(self) -> dict:
        return asdict(self)  # stages become dicts

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("stages"), list):
            values["stages"] = [Stage(**s) if isinstance(s, dict) else Stage(*s) for s in values["stages"]]
        if values.get("unfreeze_backbone_epoch") is None:  # written before unfreeze_ratio became optional
            values["unfreeze_ratio"] = values["stage2_lr"] = None
        if values.get("cache_dir") == "":  # written before --no_cache became a field
            values["cache_dir"], values["no_cache"] = None, True
        return cls(**values)


def _choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"{flag}: {value!r} is not one of {', '.join(choices)}")


def _at_least(flag: str, value, minimum) -> None:
    if value < minimum:
        raise UserError(f"{flag} must be >= {minimum}, got {value}")


def _positive(value: float) -> bool:
    return value > 0 and math.isfinite(value)
