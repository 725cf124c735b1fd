"""Settings: what a caller set (the CLI's parsed flags, or `train(**settings)`), merged with the
defaults, with what `--pretrain` implies (fine-tuning defaults and recipes), or with a checkpoint's
configs (`--pretrain`, `--resume`)."""

from __future__ import annotations

from dataclasses import fields, replace

from ..core.config import AUTO_HEAD, RECIPES, ModelConfig, Stage, TrainConfig, format_stage
from ..core.errors import UserError

# Settings that change what the weights mean: a pretrained checkpoint dictates them.
STRUCTURAL_FIELDS = (
    "arch_variant",
    "base_channels",
    "num_blocks",
    "head_variant",
    "image_size",
    "mean",
    "std",
    "token_mixer_grid",
    "token_mixer_layers",
)
# Flags that may change when a run is resumed (where data lives, how to run it, how long); everything
# that shapes the training itself comes from the checkpoint.
RESUME_OVERRIDABLE = (
    "epochs",
    "device",
    "compile",
    "num_workers",
    "cache_dir",
    "no_cache",
    "keep_last",
    "keep_best",
    "max_bad_steps",
    "save_diagnostics",
    "tensorboard",
    "data_root",
    "mix_data_root",
    "extra_val_root",
    "extra_train_root",
)

# --- fine-tuning recipes -----------------------------------------------------------------------------


def recipe_settings(name: str, epochs: int) -> dict:
    """The flags a recipe stands for, in a run of `epochs` epochs (stage epochs scale with it).

    full         everything trains from the first step
    lp-ft        linear probe, then fine-tune (Kumar et al. 2022): the first quarter of the epochs trains only
                 the head and margin head on the frozen backbone, then everything
    surgical     only the input half of the backbone trains, with the head (Lee et al. 2023: input-level shifts
                 such as a new camera, IR, blur or compression are best fixed where the input is read)
    progressive  backbone frozen for the first quarter, its output half trains from the second quarter,
                 everything from half-way (the users' hand-tuned 3-stage schedule, scaled to --epochs)
    """
    quarter = max(2, round(epochs / 4) + 1)
    half = max(quarter + 1, round(epochs / 2) + 1)
    if name == "full":
        return {}
    if name == "lp-ft":
        return {"stages": [Stage(1, 0.0), Stage(quarter, 1.0)]}
    if name == "surgical":
        return {"stages": [Stage(1, 0.5)], "unfreeze_from": "input"}
    if name == "progressive":
        return {"stages": [Stage(1, 0.0), Stage(quarter, 0.5), Stage(half, 1.0)]}
    raise UserError(f"--recipe: {name!r} is not one of {', '.join(RECIPES)}")


# What a --pretrain run uses where the flags are not given (measured by bench/transfer.py on five cases: two
# synthetic shifts with few and all labels, and real eye crops; the table and the reasons are in
# docs/finetune.md). `augment light`: the only augmentation with which the fine-tune lost to scratch on none
# of them (with `default`, real eye crops lost 0.028 beyond seed noise; style b gains 0.007-0.012 with it).
FINETUNE_DEFAULTS: dict = {"recipe": "full", "warmup_epochs": 1.0, "bn_adapt": True, "augment": "light"}


def finetune_settings(given: dict) -> tuple[dict, dict]:
    """A --pretrain run's train settings: those given, over FINETUNE_DEFAULTS, over the recipe's flags.
    -> (settings, the ones filled in, for the log and config.json)."""
    filled = {k: v for k, v in FINETUNE_DEFAULTS.items() if k not in given}
    settings = {**filled, **given}
    if settings.get("recipe"):
        flags = recipe_settings(settings["recipe"], settings.get("epochs", TrainConfig.epochs))
        schedule = {"stages", "freeze_backbone", "unfreeze_backbone_epoch"} & set(given)
        if schedule and "recipe" in given and "stages" in flags:
            raise UserError(
                f"--recipe {settings['recipe']} sets the freezing schedule; --{sorted(schedule)[0]} gives another: "
                "give one or the other"
            )
        if schedule:  # the user's schedule wins over the default recipe's
            flags.pop("stages", None)
        flags = {k: v for k, v in flags.items() if k not in given}
        settings.update(flags)
        filled.update(flags)
    return settings, filled


def settings_to_flags(settings: dict) -> list[str]:
    """The `ocec train` flags that give these settings (the inverse of parsing them)."""
    flags = []
    for name, value in settings.items():
        if value is True:
            flags.append(f"--{name}")
        elif value is False:
            flags += ["--no_bn_adapt"] if name == "bn_adapt" else []
        elif value is None:
            continue
        elif name == "stages":
            flags += [f"--{name}", ",".join(format_stage(s) for s in value)]
        elif name in ("image_size", "token_mixer_grid"):
            flags += [f"--{name}", f"{value[0]}x{value[1]}"]
        elif isinstance(value, (list, tuple)):
            flags += [f"--{name}", *map(str, value)]
        else:
            flags += [f"--{name}", str(value)]
    return flags


def describe_settings(settings: dict) -> str:
    """{'lr': 0.001, 'bn_adapt': True, 'stages': [...]} -> '--lr 0.001 --bn_adapt --stages 1:0,5:1'."""
    return " ".join(settings_to_flags(settings))


# --- settings: what the caller set, merged with a checkpoint's configs ------------------------------

MODEL_FIELDS = frozenset(f.name for f in fields(ModelConfig))
TRAIN_FIELDS = frozenset(f.name for f in fields(TrainConfig))


def split_settings(settings: dict) -> tuple[dict, dict]:
    """{flag name: value} -> (TrainConfig fields, ModelConfig fields); an unknown name is a TypeError."""
    unknown = sorted(set(settings) - MODEL_FIELDS - TRAIN_FIELDS)
    if unknown:
        raise TypeError(f"unknown training setting(s): {', '.join(unknown)}")
    return (
        {k: v for k, v in settings.items() if k in TRAIN_FIELDS},
        {k: v for k, v in settings.items() if k in MODEL_FIELDS},
    )


def scratch_model_config(given: dict) -> ModelConfig:
    _check_margin_flags(given.get("margin_method", ModelConfig.margin_method), given)
    return ModelConfig(**given).validate()


def pretrained_model_config(checkpoint: ModelConfig, given: dict, flag: str = "--pretrain") -> ModelConfig:
    """The checkpoint's structure with the caller's non-structural choices (dropout, margin method, s, m).

    A structural setting given with a value other than the checkpoint's is an error listing every
    mismatch, because silently building a different network would load the weights partially or not at all.
    """
    _refuse_structural_changes(checkpoint, given, flag)
    method = given.get("margin_method", checkpoint.margin_method)
    _check_margin_flags(method, given)
    changes = {k: given[k] for k in ("dropout", "margin_s", "margin_m") if k in given}
    if method != checkpoint.margin_method:  # a new margin head: the given s and m, else the method's defaults
        changes.update(margin_method=method, margin_s=given.get("margin_s"), margin_m=given.get("margin_m"))
    return replace(checkpoint, **changes).validate()


def resumed_configs(
    saved_train: TrainConfig, saved_model: ModelConfig, given_train: dict, given_model: dict
) -> tuple[TrainConfig, ModelConfig, list[str]]:
    """The checkpoint's configs with the overridable flags replaced -> (train, model, flags ignored).

    The result describes the run being continued (its `pretrain` record included), not how it was restarted."""
    _refuse_structural_changes(saved_model, given_model, "--resume")
    for name in ("margin_method", "margin_s", "margin_m"):
        if name in given_model and given_model[name] != getattr(saved_model, name):
            raise UserError(f"--resume: {name}: checkpoint={getattr(saved_model, name)}, given={given_model[name]}")
    overrides = {k: v for k, v in given_train.items() if k in RESUME_OVERRIDABLE}
    ignored = set(given_train) - set(RESUME_OVERRIDABLE) - {"resume"}
    ignored |= set(given_model) - set(STRUCTURAL_FIELDS) - {"margin_method", "margin_s", "margin_m"}
    cfg = replace(saved_train, **overrides)
    return cfg.validate(), saved_model, ["--" + name for name in sorted(ignored)]


def _refuse_structural_changes(checkpoint: ModelConfig, given: dict, flag: str) -> None:
    mismatches = []
    for name in STRUCTURAL_FIELDS:
        if name not in given:
            continue
        ours, theirs = given[name], getattr(checkpoint, name)
        if isinstance(theirs, tuple):
            ours = tuple(ours)
        if name == "head_variant":  # compare what would be built, resolving 'auto' for the arch in use
            arch = given.get("arch_variant", checkpoint.arch_variant)
            ours, theirs = (AUTO_HEAD.get(arch) if ours == "auto" else ours), checkpoint.resolved_head
        if ours != theirs:
            mismatches.append(f"{name}: checkpoint={_show(theirs)}, given={_show(ours)}")
    if mismatches:
        raise UserError(f"{flag}: the checkpoint's architecture differs from the flags given: " + "; ".join(mismatches))


def _check_margin_flags(method: str, given: dict) -> None:
    if method == "none":
        for name in ("margin_s", "margin_m"):
            if name in given:
                raise UserError(f"--{name} applies to cosface/arcface heads; --margin_method none has no margin")


def _show(value) -> str:
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    return str(value)
