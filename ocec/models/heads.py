"""Heads: last feature map -> embedding (the margin head classifies it). Each is upstream's head minus its
final Linear(-> 1 logit), which is ocec's `margin_head.fc` when the margin method is `none`.

avg          global average pool -> BatchNorm1d -> dropout
avgmax_mlp   [average, max] pools -> BatchNorm1d -> dropout -> Linear -> ReLU -> dropout
transformer  average-pool onto a token grid -> pre-norm Transformer encoder layers -> mean of tokens ->
             LayerNorm -> dropout
mlp_mixer    the same with MLP-Mixer blocks (token-mixing and channel-mixing MLPs)

The attention is written out (not nn.TransformerEncoderLayer) so the exported ONNX graph is plain
MatMul/Softmax/LayerNorm, which older OpenCV DNN releases read; the parameter names are
nn.TransformerEncoderLayer's, as in upstream's checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ModelConfig


class AvgHead(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.norm = nn.BatchNorm1d(channels)
        self.drop = nn.Dropout(dropout)
        self.out_features = channels

    def forward(self, x):
        return self.drop(self.norm(x.mean((2, 3))))


class AvgMaxMLPHead(nn.Module):
    def __init__(self, channels: int, dropout: float, hidden: int | None = None):
        super().__init__()
        hidden = max(16, channels) if hidden is None else hidden  # upstream: max(16, 2 * channels // 2)
        self.norm = nn.BatchNorm1d(2 * channels)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * channels, hidden)
        self.out_features = hidden

    def forward(self, x):
        pooled = torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)
        return self.drop(F.relu(self.fc(self.drop(self.norm(pooled)))))


def attention_heads(channels: int) -> int:
    """Upstream's choice: the largest divisor of the channels up to 8."""
    return next(h for h in range(min(8, channels), 0, -1) if channels % h == 0)


class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameters (in_proj_weight/bias, out_proj)."""

    def __init__(self, channels: int, heads: int, dropout: float, tokens: int):
        super().__init__()
        # constant shapes (batch -1) in every reshape: OpenCV DNN cannot infer reshapes from Shape ops
        self.heads, self.dropout, self.tokens, self.channels = heads, dropout, tokens, channels
        self.in_proj_weight = nn.Parameter(torch.empty(3 * channels, channels))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * channels))
        self.out_proj = nn.Linear(channels, channels)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x):  # [N, T, C]
        t, c, h = self.tokens, self.channels, self.heads
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (z.reshape(-1, t, h, c // h).transpose(1, 2) for z in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-2, -1) * (c // h) ** -0.5, dim=-1)
        weights = F.dropout(weights, self.dropout, self.training)
        return self.out_proj((weights @ v).transpose(1, 2).reshape(-1, t, c))


class EncoderLayer(nn.Module):
    """Pre-norm Transformer encoder layer (nn.TransformerEncoderLayer with norm_first, GELU)."""

    def __init__(self, channels: int, dropout: float, tokens: int):
        super().__init__()
        self.self_attn = SelfAttention(channels, attention_heads(channels), dropout, tokens)
        self.linear1 = nn.Linear(channels, max(128, 2 * channels))
        self.linear2 = nn.Linear(max(128, 2 * channels), channels)
        self.norm1 = nn.LayerNorm(channels)
        self.norm2 = nn.LayerNorm(channels)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.drop(self.self_attn(self.norm1(x)))
        return x + self.drop(self.linear2(self.drop(F.gelu(self.linear1(self.norm2(x))))))


class MixerBlock(nn.Module):
    """MLP-Mixer block: an MLP across the tokens, then one across the channels, each pre-normed, residual."""

    def __init__(self, tokens: int, channels: int, dropout: float):
        super().__init__()
        self.norm_tokens = nn.LayerNorm(channels)
        self.token_fc1 = nn.Linear(tokens, 2 * tokens)
        self.token_fc2 = nn.Linear(2 * tokens, tokens)
        self.norm_channels = nn.LayerNorm(channels)
        self.channel_fc1 = nn.Linear(channels, 2 * channels)
        self.channel_fc2 = nn.Linear(2 * channels, channels)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):  # [N, T, C]
        y = self.norm_tokens(x).transpose(1, 2)
        y = self.drop(self.token_fc2(self.drop(F.gelu(self.token_fc1(y)))))
        x = x + y.transpose(1, 2)
        y = self.drop(self.channel_fc2(self.drop(F.gelu(self.channel_fc1(self.norm_channels(x))))))
        return x + y


class Layers(nn.Module):
    """A stack named `layers.N` (nn.TransformerEncoder's names)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class TokenMixerHead(nn.Module):
    def __init__(self, channels: int, cfg: ModelConfig, feature_map: tuple[int, int]):
        super().__init__()
        gh, gw = cfg.token_mixer_grid
        self.kernel = (feature_map[0] // gh, feature_map[1] // gw)  # the grid divides it (checked by the config)
        tokens = self.tokens = gh * gw
        if cfg.resolved_head == "transformer":
            self.mixer = Layers([EncoderLayer(channels, cfg.dropout, tokens) for _ in range(cfg.token_mixer_layers)])
        else:
            self.mixer = nn.Sequential(
                *(MixerBlock(tokens, channels, cfg.dropout) for _ in range(cfg.token_mixer_layers))
            )
        self.final_norm = nn.LayerNorm(channels)
        self.drop = nn.Dropout(cfg.dropout)
        self.out_features = channels

    def forward(self, x):
        pooled = F.avg_pool2d(x, self.kernel, self.kernel)
        tokens = pooled.reshape(-1, self.out_features, self.tokens).transpose(1, 2)  # [N, gh*gw, C]
        return self.drop(self.final_norm(self.mixer(tokens).mean(1)))


def build_head(cfg: ModelConfig, channels: int, feature_map: tuple[int, int]) -> nn.Module:
    head = cfg.resolved_head
    if head == "avg":
        return AvgHead(channels, cfg.dropout)
    if head == "avgmax_mlp":
        return AvgMaxMLPHead(channels, cfg.dropout, cfg.mlp_hidden)
    return TokenMixerHead(channels, cfg, feature_map)
