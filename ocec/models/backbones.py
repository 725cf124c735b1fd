"""Backbones: image -> last feature map. Each is a `stem` and `features.0 .. features.{n-1}` (the units
fine-tuning freezes and releases); channels double at every block with stride 2 (even i > 0).

`baseline`, `inverted_se` and `convnext` are the upstream trainer's (PINTO0309/OCEC) networks with the
same module layout, so an upstream state dict loads by prefixing `backbone.`. The `*_v1` variants are
ocec 0.x's own under the old names, kept so its checkpoints load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ModelConfig


def block_plan(base_channels: int, num_blocks: int) -> list[tuple[int, int, int]]:
    """(in_channels, out_channels, stride) per block: stride 2 and doubled channels at even i > 0."""
    plan, channels = [], base_channels
    for i in range(num_blocks):
        stride = 2 if i > 0 and i % 2 == 0 else 1
        out = channels * 2 if stride == 2 else channels
        plan.append((channels, out, stride))
        channels = out
    return plan


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


# --- baseline: depthwise-separable blocks ------------------------------------------------------------


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.depthwise = nn.Sequential(*conv_bn(cin, cin, 3, stride, groups=cin), nn.ReLU(inplace=True))
        self.pointwise = nn.Sequential(*conv_bn(cin, cout, 1))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.pointwise(self.depthwise(x))
        # in place: BatchNorm's backward does not need its output (about 4% faster on CPU, batch 256)
        return (y.add_(x) if self.residual else y).relu_()


# --- inverted_se: MobileNetV2 inverted residual + squeeze-excitation, SiLU (upstream's) ----------------


class SqueezeExcite(nn.Module):
    """Channel gates from the pooled map: fc = 1x1 conv -> ReLU -> 1x1 conv -> sigmoid."""

    def __init__(self, channels: int, reduction: int, min_hidden: int = 1):
        super().__init__()
        hidden = max(min_hidden, channels // max(1, reduction))
        self.fc = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1), nn.Sigmoid()
        )

    def forward(self, x):
        return x * self.fc(x.mean((2, 3), keepdim=True))


class InvertedResidualSE(nn.Module):
    """expand 1x1 (when expansion > 1) -> depthwise 3x3 -> SE -> project 1x1, residual, then SiLU."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int, se_reduction: int):
        super().__init__()
        hidden = cin * expansion
        layers = [*conv_bn(cin, hidden, 1), nn.SiLU(inplace=True)] if expansion != 1 else []
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.SiLU(inplace=True)]
        layers += [SqueezeExcite(hidden, se_reduction)] if se_reduction > 0 else []
        layers += conv_bn(hidden, cout, 1)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return F.silu(y + x if self.residual else y)


def inverted_se_stem(channels: int) -> nn.Sequential:
    return nn.Sequential(
        *conv_bn(3, channels, 3), nn.SiLU(inplace=True), *conv_bn(channels, channels, 3, 2), nn.SiLU(inplace=True)
    )


# --- convnext: 4x4/4 patchify stem, 7x7 depthwise conv, LayerNorm, inverted MLP, layer scale ------------


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW tensor."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """x + gamma * MLP(LayerNorm(dwconv7x7(x))). Upstream starts gamma at 1e-6 (ConvNeXt's value)."""

    def __init__(self, channels: int, expansion: int = 4, gamma: float = 1e-6, wrapped_norm: bool = True):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = LayerNorm2d(channels) if wrapped_norm else nn.LayerNorm(channels, eps=1e-6)
        self.pwconv1 = nn.Linear(channels, channels * expansion)
        self.pwconv2 = nn.Linear(channels * expansion, channels)
        self.gamma = nn.Parameter(torch.full((channels,), gamma))

    def forward(self, x):
        norm = self.norm.norm if isinstance(self.norm, LayerNorm2d) else self.norm  # both over channels-last
        y = self.pwconv2(F.gelu(self.pwconv1(norm(self.dwconv(x).permute(0, 2, 3, 1)))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    """LayerNorm, then a 2x2 stride-2 convolution (between ConvNeXt stages)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.op = nn.Sequential(LayerNorm2d(cin), nn.Conv2d(cin, cout, 2, 2))

    def forward(self, x):
        return self.op(x)


def convnext_unit(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(*([Downsample(cin, cout)] if stride != 1 else []), ConvNeXtBlock(cout))


# --- ocec 0.x variants (format 1 checkpoints) ----------------------------------------------------------


class InvertedResidualSEv1(nn.Module):
    """ocec 0.x: ReLU everywhere, always an expansion layer, no activation after the residual."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int, se_reduction: int):
        super().__init__()
        hidden = cin * expansion
        self.block = nn.Sequential(
            *conv_bn(cin, hidden, 1),
            nn.ReLU(inplace=True),
            *conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.ReLU(inplace=True),
            SqueezeExcite(hidden, se_reduction, min_hidden=4),
            *conv_bn(hidden, cout, 1),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return y + x if self.residual else y


def convnext_v1_unit(cin: int, cout: int, stride: int, expansion: int) -> nn.Sequential:
    block = ConvNeXtBlock(cout, expansion, gamma=0.1, wrapped_norm=False)
    if stride == 1:
        return nn.Sequential(block)
    return nn.Sequential(nn.Sequential(LayerNorm2d(cin), nn.Conv2d(cin, cout, stride, stride)), block)


# --- assembly ------------------------------------------------------------------------------------------


def build_stem(arch: str, channels: int) -> nn.Sequential:
    if arch == "baseline":
        return nn.Sequential(*conv_bn(3, channels, 3, 2), nn.ReLU(inplace=True))
    if arch == "inverted_se":
        return inverted_se_stem(channels)
    if arch == "convnext":
        return nn.Sequential(nn.Conv2d(3, channels, 4, 4), LayerNorm2d(channels))
    if arch == "inverted_se_v1":
        return nn.Sequential(
            *conv_bn(3, channels, 3, 2), nn.ReLU(inplace=True), *conv_bn(channels, channels, 3), nn.ReLU(inplace=True)
        )
    return nn.Sequential(nn.Conv2d(3, channels, 4, 2, 1), LayerNorm2d(channels))  # convnext_v1


def build_block(cfg: ModelConfig, cin: int, cout: int, stride: int) -> nn.Module:
    arch = cfg.arch_variant
    if arch == "baseline":
        return DepthwiseSeparable(cin, cout, stride)
    if arch == "inverted_se":
        return InvertedResidualSE(cin, cout, stride, cfg.expansion, cfg.se_reduction)
    if arch == "convnext":
        return convnext_unit(cin, cout, stride)
    if arch == "inverted_se_v1":
        return InvertedResidualSEv1(cin, cout, stride, cfg.expansion, cfg.se_reduction)
    return convnext_v1_unit(cin, cout, stride, cfg.expansion)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        plan = block_plan(cfg.base_channels, cfg.num_blocks)
        self.stem = build_stem(cfg.arch_variant, cfg.base_channels)
        self.features = nn.Sequential(*(build_block(cfg, cin, cout, s) for cin, cout, s in plan))
        self.out_channels = plan[-1][1]

    def unit_names(self) -> list[str]:
        """Trainable units from input to output; staged unfreezing counts them from the end."""
        return ["stem"] + [f"features.{i}" for i in range(len(self.features))]

    def forward(self, x):
        return self.features(self.stem(x))
