"""Import checkpoints written by the existing (upstream) `ocec train`.

Their format is described in shared/spec/upstream-checkpoint.md: a dict with `model_config`,
`train_config`, `normalization` and `model_state` whose names are `stem.*`, `features.*`,
`head.*`. The model outputs one BCE logit. The renaming is data (a table of regex patterns
per architecture), so supporting another upstream variant means adding rows, not branches.
"""

from __future__ import annotations

import re

from ..core.config import ModelConfig
from ..core.errors import UserError

# (pattern, replacement) applied to upstream state-dict names; the first match wins. The backbones have
# upstream's layout; each head's final Linear(-> 1) is our margin_head.fc (margin method none).
BACKBONE_MAP = [(r"^stem\.", "backbone.stem."), (r"^features\.", "backbone.features.")]
HEAD_MAP: dict[str, list[tuple[str, str]]] = {
    "avg": [
        (r"^head\.0\.", "head.norm."),  # BatchNorm1d after global average pooling
        (r"^head\.2\.", "margin_head.fc."),  # Linear(C -> 1): the one-logit classifier
    ],
    "avgmax_mlp": [
        (r"^head\.0\.", "head.norm."),
        (r"^head\.2\.", "head.fc."),
        (r"^head\.[45]\.", "margin_head.fc."),  # 4 without dropout, 5 after the second dropout
    ],
    "transformer": [(r"^head\.fc\.", "margin_head.fc."), (r"^head\.(mixer|final_norm)\.", r"head.\1.")],
    "mlp_mixer": [(r"^head\.fc\.", "margin_head.fc."), (r"^head\.(mixer|final_norm)\.", r"head.\1.")],
}
UPSTREAM_ARCHS = ("baseline", "inverted_se", "convnext")
UPSTREAM_AUTO_HEAD = {"baseline": "avg", "inverted_se": "avgmax_mlp", "convnext": "transformer"}


def is_upstream_checkpoint(ckpt: dict) -> bool:
    return isinstance(ckpt, dict) and "model_state" in ckpt and "ocec_format" not in ckpt and "model_config" in ckpt


def convert_upstream(ckpt: dict, source: str) -> tuple[ModelConfig, dict, dict]:
    """-> (our ModelConfig, renamed state dict, metrics) for an upstream checkpoint."""
    up_cfg = ckpt.get("model_config") or {}
    arch = str(up_cfg.get("arch_variant") or "baseline").lower()
    if arch not in UPSTREAM_ARCHS:
        raise UserError(
            f"{source}: upstream checkpoints with arch_variant={arch!r} cannot be imported "
            f"(supported: {', '.join(UPSTREAM_ARCHS)})"
        )
    head = str(up_cfg.get("head_variant") or "auto").lower()
    head = UPSTREAM_AUTO_HEAD[arch] if head == "auto" else head
    if head not in HEAD_MAP:
        raise UserError(
            f"{source}: upstream head_variant={head!r} cannot be imported (supported: {', '.join(HEAD_MAP)})"
        )
    grid = up_cfg.get("token_mixer_grid") or (3, 2)  # upstream's fallback for a missing grid
    norm = ckpt.get("normalization") or {}
    train_cfg = ckpt.get("train_config") or {}
    image_size = norm.get("image_size") or train_cfg.get("image_size")
    if not image_size:
        raise UserError(f"{source}: upstream checkpoint records no image_size")
    cfg = ModelConfig(
        arch_variant=arch,
        base_channels=int(up_cfg["base_channels"]),
        num_blocks=int(up_cfg["num_blocks"]),
        head_variant=head,
        dropout=float(up_cfg.get("dropout", 0.3)),
        margin_method="none",
        image_size=tuple(image_size),
        mean=tuple(norm.get("mean", (0.0, 0.0, 0.0))),
        std=tuple(norm.get("std", (1.0, 1.0, 1.0))),
        expansion=int(up_cfg.get("expansion", 4)),
        se_reduction=int(up_cfg.get("se_reduction", 8)),
        token_mixer_grid=(int(grid[0]), int(grid[1])),
        token_mixer_layers=max(1, int(up_cfg.get("token_mixer_layers", 2))),
    )
    state = {}
    unmapped = []
    for name, tensor in ckpt["model_state"].items():
        new = rename(name, BACKBONE_MAP + HEAD_MAP[head])
        if new is None:
            unmapped.append(name)
        else:
            state[new] = tensor
    if unmapped:
        raise UserError(
            f"{source}: upstream tensors with no mapping: {', '.join(unmapped[:5])}"
            + (f" (+{len(unmapped) - 5} more)" if len(unmapped) > 5 else "")
        )
    metrics = dict(ckpt.get("val_metrics") or {})
    if "best_f1" in ckpt and "f1" not in metrics:
        metrics["f1"] = ckpt["best_f1"]
    return cfg, state, metrics


def rename(name: str, table: list[tuple[str, str]]) -> str | None:
    for pattern, replacement in table:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name, count=1)
    return None
