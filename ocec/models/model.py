"""The network: backbone -> head (embedding) -> margin_head (classifier).

Parameter names start with `backbone.`, `head.` or `margin_head.`, which is how fine-tuning
assigns learning rates and freezes parts. The backbones are in `backbones.py`, the heads in `heads.py`.

With `margin_method none` every architecture computes exactly the function of the upstream OCEC
trainer's model of the same name, so its checkpoints import 1:1 (see `upstream.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.config import ModelConfig, feature_map_size
from .backbones import Backbone, block_plan
from .heads import build_head
from .margin import build_margin_head

__all__ = ["OcecModel", "build_model", "block_plan", "parameter_group_of"]


class OcecModel(nn.Module):
    """Input: RGB in [0, 1], [N, 3, H, W]. `forward` returns one margin-free logit per image (open > 0)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.backbone = Backbone(cfg)
        feature_map = feature_map_size(cfg.arch_variant, cfg.image_size, cfg.num_blocks)
        self.head = build_head(cfg, self.backbone.out_channels, feature_map)
        self.margin_head = build_margin_head(cfg.margin_method, self.head.out_features, cfg.margin_s, cfg.margin_m)
        # Normalisation lives in the model (not the data pipeline) so exports and predict agree.
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone((x - self.mean) / self.std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.margin_head.logit(self.embed(x))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Probability that each eye is open."""
        return torch.sigmoid(self.forward(x).float())


def build_model(cfg: ModelConfig) -> OcecModel:
    return OcecModel(cfg.validate())


def parameter_group_of(name: str) -> str:
    """'backbone', 'head' or 'margin_head' for a parameter or buffer name."""
    return name.split(".", 1)[0]
