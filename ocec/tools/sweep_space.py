"""The search space of `ocec sweep`: Optuna distribution specs by parameter name, a --space file that
replaces entries by name (checked: unknown names and invalid ranges end with exit 2 and one line), the
documented defaults enqueued as the first trials, and how a trial's parameters become `ocec train` flags."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..core.errors import UserError

RECIPE_CHOICES = ["scratch", "full", "lp-ft", "surgical", "progressive"]
# The default search space: name -> Optuna distribution spec. A --space file replaces entries by name.
DEFAULT_SPACE = {
    "recipe": {"type": "categorical", "choices": RECIPE_CHOICES},
    "lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
    "backbone_lr_ratio": {"type": "float", "low": 0.1, "high": 1.0, "log": True},
    "weight_decay": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
    "warmup_epochs": {"type": "float", "low": 0.0, "high": 3.0},
    "ema_decay": {"type": "categorical", "choices": [0.0, 0.99, 0.999]},
    "bn_adapt": {"type": "categorical", "choices": [True, False]},
    "mix_ratio": {"type": "float", "low": 0.1, "high": 0.5},
    "augment": {"type": "categorical", "choices": ["none", "light", "default"]},
    "margin_method": {"type": "categorical", "choices": ["cosface", "arcface", "none"]},
}
ALLOWED_CHOICES = {
    "recipe": set(RECIPE_CHOICES),
    "augment": {"none", "light", "default"},
    "margin_method": {"cosface", "arcface", "none"},
    "bn_adapt": {True, False},
}
# The documented defaults, enqueued first so the leaderboard always shows them beside the search's finds.
DEFAULT_TRIAL = {
    "recipe": "full",
    "lr": 1e-3,
    "backbone_lr_ratio": 1.0,
    "weight_decay": 1e-4,
    "warmup_epochs": 1.0,
    "ema_decay": 0.0,
    "bn_adapt": True,
    "mix_ratio": 0.3,
    "augment": "default",
    "margin_method": "cosface",
}
SCRATCH_TRIAL = {k: v for k, v in DEFAULT_TRIAL.items() if k not in ("bn_adapt", "backbone_lr_ratio")}
SCRATCH_TRIAL.update(recipe="scratch", warmup_epochs=3.0)


def load_space(path: str | None, *, pretrain: bool, mix: bool, fixed: dict | set = frozenset()) -> dict:
    """The default space, with a --space file's entries (YAML or JSON) replacing those of the same name.
    Parameters that cannot apply are left out: recipes without --pretrain, mix_ratio without --mix_data_root,
    and every one whose flag was given (it stays fixed)."""
    space = {k: dict(v) for k, v in DEFAULT_SPACE.items()}
    if path:
        space.update(_read_space_file(Path(path)))
    for name, spec in space.items():
        _check_spec(name, spec, path)
    if not pretrain:
        for name in ("recipe", "bn_adapt", "backbone_lr_ratio"):
            space.pop(name, None)
    if not mix:
        space.pop("mix_ratio", None)
    for name in set(fixed) & set(space):
        space.pop(name)
    if "backbone_lr" in fixed or ("lr" not in space and "lr" not in fixed):
        space.pop("backbone_lr_ratio", None)  # nothing to take the ratio of, or the backbone's LR is given
    return space


def _read_space_file(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"--space {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error of a user file is the user's to fix
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"--space {path}: not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'} ({first})"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"--space {path}: expected a mapping of parameter name -> distribution")
    unknown = sorted(set(data) - set(DEFAULT_SPACE))
    if unknown:
        raise UserError(
            f"--space {path}: unknown parameter(s) {', '.join(unknown)} (known: {', '.join(DEFAULT_SPACE)})"
        )
    return data


# What each numeric parameter's train flag accepts (TrainConfig.validate): (low, high, high included).
# ema_decay 0 is the sweep's "off"; a ratio multiplies --lr.
VALID_RANGE = {
    "lr": (0.0, math.inf, False),
    "backbone_lr_ratio": (0.0, math.inf, False),
    "weight_decay": (0.0, math.inf, False),
    "warmup_epochs": (0.0, math.inf, False),
    "ema_decay": (0.0, 1.0, False),
    "mix_ratio": (0.0, 1.0, False),
}
STRICTLY_ABOVE_LOW = {"lr", "backbone_lr_ratio", "mix_ratio"}


def _check_values(name: str, values: list, where: str) -> None:
    """Every value a parameter can take must be one its train flag accepts, or every trial would fail."""
    if name not in VALID_RANGE:
        return
    low, high, _ = VALID_RANGE[name]
    for value in values:
        above = value > low if name in STRICTLY_ABOVE_LOW else value >= low
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not (above and value < high):
            bound = f"{'(' if name in STRICTLY_ABOVE_LOW else '['}{low:g}, {high:g})"
            flag = "--backbone_lr / --lr" if name == "backbone_lr_ratio" else f"--{name}"
            raise UserError(f"{where}: {value!r} is outside what {flag} accepts, {bound}")


def _check_spec(name: str, spec, path) -> None:
    where = f"--space {path}: {name}" if path else f"search space: {name}"
    if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
        raise UserError(f"{where}: expected {{type: float|int|categorical, ...}}, got {spec!r}")
    if spec["type"] == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: a categorical needs a non-empty list of choices")
        bad = [c for c in choices if name in ALLOWED_CHOICES and c not in ALLOWED_CHOICES[name]]
        if bad:
            raise UserError(f"{where}: invalid choice(s) {bad} (allowed: {sorted(ALLOWED_CHOICES[name], key=str)})")
        _check_values(name, choices, where)
        return
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)):
        raise UserError(f"{where}: needs numeric low and high, got low={low!r} high={high!r}")
    if not low < high:
        raise UserError(f"{where}: low must be below high, got low={low} high={high}")
    if spec.get("log") and low <= 0:
        raise UserError(f"{where}: a log range needs low > 0, got {low}")
    _check_values(name, [low, high], where)


FINE_TUNE_ONLY = ("bn_adapt", "backbone_lr_ratio")  # a scratch trial has no pretrained backbone to apply them to


def suggest(trial, space: dict) -> dict:
    params = {}
    for name, spec in space.items():
        if name in FINE_TUNE_ONLY and params.get("recipe") == "scratch":
            continue
        if spec["type"] == "categorical":
            params[name] = trial.suggest_categorical(name, spec["choices"])
        elif spec["type"] == "int":
            params[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")))
        else:
            params[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
    return params


def trial_recipe(params: dict, pretrain: list[str], fixed: dict) -> str:
    """What a trial runs: the fixed --recipe, else the searched one, else full with --pretrain (scratch without)."""
    return fixed.get("recipe") or params.get("recipe") or ("full" if pretrain else "scratch")


def trial_flags(params: dict, pretrain: list[str], fixed: dict | None = None) -> list[str]:
    """Trial parameters -> `ocec train` flags, to come before the sweep's fixed flags (argparse keeps the last
    value, so a fixed flag always wins); a searched parameter never emits a flag the user fixed."""
    fixed = fixed or {}
    flags = []
    recipe = trial_recipe(params, pretrain, fixed)
    if recipe != "scratch":
        flags += ["--pretrain", *pretrain]
        if "recipe" not in fixed:
            flags += ["--recipe", recipe]
        if "bn_adapt" in params:
            flags += ["--bn_adapt"] if params["bn_adapt"] else ["--no_bn_adapt"]
    lr = params.get("lr", fixed.get("lr"))
    if "lr" in params:
        flags += ["--lr", f"{params['lr']:.6g}"]
    if recipe != "scratch" and "backbone_lr_ratio" in params and lr is not None:
        flags += ["--backbone_lr", f"{lr * params['backbone_lr_ratio']:.6g}"]
    for name in ("weight_decay", "warmup_epochs", "mix_ratio"):
        if name in params:
            flags += [f"--{name}", f"{params[name]:.6g}"]
    if params.get("ema_decay"):
        flags += ["--ema_decay", f"{params['ema_decay']:g}"]
    for name in ("augment", "margin_method"):
        if name in params:
            flags += [f"--{name}", str(params[name])]
    return flags


def default_trials(space: dict, pretrain: list[str]) -> list[dict]:
    """The documented fine-tune defaults and scratch, as far as `space` admits them: the first trials."""
    if "recipe" in space:
        trials = [DEFAULT_TRIAL, SCRATCH_TRIAL]
    else:  # the recipe is fixed (or there is nothing to fine-tune from): one default trial
        trials = [DEFAULT_TRIAL if pretrain else SCRATCH_TRIAL]
    return [{k: v for k, v in values.items() if k in space and _admits(space[k], v)} for values in trials]


def _admits(spec: dict, value) -> bool:
    if spec["type"] == "categorical":
        return value in spec["choices"]
    return spec["low"] <= value <= spec["high"]
