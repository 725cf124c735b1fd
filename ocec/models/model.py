"""The network: backbone -> head (embedding) -> margin_head (classifier).

Parameter names start with `backbone.`, `head.` or `margin_head.`, which is how fine-tuning
assigns learning rates and freezes parts. The backbone's trainable units are `stem` and
`features.0 .. features.{n-1}`; channels double at every block with stride 2 (even i > 0).

The `baseline` backbone + `avg` head + `none` margin compute exactly the function of the
upstream OCEC trainer's baseline model, so its checkpoints import 1:1 (see `upstream.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ModelConfig
from .margin import build_margin_head


def block_plan(base_channels: int, num_blocks: int) -> list[tuple[int, int, int]]:
    """(in_channels, out_channels, stride) per block: stride 2 and doubled channels at even i > 0."""
    plan, channels = [], base_channels
    for i in range(num_blocks):
        stride = 2 if i > 0 and i % 2 == 0 else 1
        out = channels * 2 if stride == 2 else channels
        plan.append((channels, out, stride))
        channels = out
    return plan


# --- baseline: depthwise-separable blocks -------------------------------------------------


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.depthwise = nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        )
        self.pointwise = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.pointwise(self.depthwise(x))
        # in place: BatchNorm's backward does not need its output (about 4% faster on CPU, batch 256)
        return (y.add_(x) if self.residual else y).relu_()


def baseline_stem(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, channels, 3, 2, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


# --- inverted_se: MobileNetV2-style inverted residual with squeeze-excitation ---------------


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))


class InvertedResidualSE(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int, se_reduction: int):
        super().__init__()
        hidden = cin * expansion
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            SqueezeExcite(hidden, se_reduction),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return y + x if self.residual else y


def inverted_se_stem(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, 2, 1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
    )


# --- convnext: 7x7 depthwise conv, LayerNorm, inverted MLP, layer scale ---------------------


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of an NCHW tensor."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, channels: int, expansion: int):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels, eps=1e-6)
        self.pwconv1 = nn.Linear(channels, channels * expansion)
        self.pwconv2 = nn.Linear(channels * expansion, channels)
        # Layer scale starts small (not ConvNeXt's 1e-6: nets this shallow would barely train).
        self.gamma = nn.Parameter(torch.full((channels,), 0.1))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


def convnext_unit(cin: int, cout: int, stride: int, expansion: int) -> nn.Sequential:
    if stride == 1:
        return nn.Sequential(ConvNeXtBlock(cout, expansion))
    downsample = nn.Sequential(LayerNorm2d(cin), nn.Conv2d(cin, cout, stride, stride))
    return nn.Sequential(downsample, ConvNeXtBlock(cout, expansion))


def convnext_stem(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, channels, 4, 2, 1), LayerNorm2d(channels))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        plan = block_plan(cfg.base_channels, cfg.num_blocks)
        if cfg.arch_variant == "baseline":
            self.stem = baseline_stem(cfg.base_channels)
            blocks = [DepthwiseSeparable(cin, cout, s) for cin, cout, s in plan]
        elif cfg.arch_variant == "inverted_se":
            self.stem = inverted_se_stem(cfg.base_channels)
            blocks = [InvertedResidualSE(cin, cout, s, cfg.expansion, cfg.se_reduction) for cin, cout, s in plan]
        else:
            self.stem = convnext_stem(cfg.base_channels)
            blocks = [convnext_unit(cin, cout, s, cfg.expansion) for cin, cout, s in plan]
        self.features = nn.Sequential(*blocks)
        self.out_channels = plan[-1][1]

    def unit_names(self) -> list[str]:
        """Trainable units from input to output; staged unfreezing counts them from the end."""
        return ["stem"] + [f"features.{i}" for i in range(len(self.features))]

    def forward(self, x):
        return self.features(self.stem(x))


# --- heads: feature map -> embedding ----------------------------------------------------------


class AvgHead(nn.Module):
    """Global average pool -> BatchNorm -> dropout (the upstream baseline head minus its classifier)."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.norm = nn.BatchNorm1d(channels)
        self.drop = nn.Dropout(dropout)
        self.out_features = channels

    def forward(self, x):
        return self.drop(self.norm(x.mean((2, 3))))


class AvgMaxMLPHead(nn.Module):
    """Concatenated average and max pools -> BatchNorm -> dropout -> Linear -> ReLU."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.norm = nn.BatchNorm1d(2 * channels)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * channels, channels)
        self.out_features = channels

    def forward(self, x):
        pooled = torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)
        return F.relu(self.fc(self.drop(self.norm(pooled))))


class OcecModel(nn.Module):
    """Input: RGB in [0, 1], [N, 3, H, W]. `forward` returns one margin-free logit per image (open > 0)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.backbone = Backbone(cfg)
        head_cls = AvgHead if cfg.resolved_head == "avg" else AvgMaxMLPHead
        self.head = head_cls(self.backbone.out_channels, cfg.dropout)
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
