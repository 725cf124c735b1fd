"""Classifier layers on top of the embedding, named `margin_head` in every model.

- `LinearLogit` (margin_method none): one logit, BCE loss. This is the upstream trainer's classifier.
- `CosFace` / `ArcFace`: two L2-normalised class weights; the cosine is computed in fp32 and
  the margin is applied to the *training* loss only. Inference uses the margin-free logit
  s * (cos_open - cos_closed), so sigmoid(logit) is the softmax probability of "open".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LinearLogit(nn.Module):
    def __init__(self, in_features: int):
        super().__init__()
        self.fc = nn.Linear(in_features, 1)

    def logit(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.fc(embedding).squeeze(-1)

    def training_loss(self, embedding, labels, class_weight=None) -> tuple[torch.Tensor, torch.Tensor]:
        logit = self.logit(embedding).float()
        pos_weight = None if class_weight is None else class_weight[1] / class_weight[0]
        loss = F.binary_cross_entropy_with_logits(logit, labels.float(), pos_weight=pos_weight)
        return loss, logit


class CosineMarginHead(nn.Module):
    """Normalised two-class cosine layer; subclasses define the margin on the target cosine."""

    def __init__(self, in_features: int, scale: float, margin: float):
        super().__init__()
        self.scale, self.margin = float(scale), float(margin)
        self.weight = nn.Parameter(torch.empty(2, in_features))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, embedding: torch.Tensor) -> torch.Tensor:
        with torch.autocast(embedding.device.type, enabled=False):
            cos = F.linear(F.normalize(embedding.float(), dim=-1), F.normalize(self.weight.float(), dim=-1))
        return cos.clamp(-1.0, 1.0)

    def logit(self, embedding: torch.Tensor) -> torch.Tensor:
        cos = self.cosine(embedding)
        return self.scale * (cos[:, 1] - cos[:, 0])

    def apply_margin(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_loss(self, embedding, labels, class_weight=None) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cosine(embedding)
        loss = F.cross_entropy(self.scale * self.apply_margin(cos, labels), labels, weight=class_weight)
        return loss, self.scale * (cos[:, 1] - cos[:, 0]).detach()

    def init_from_linear(self, linear_weight: torch.Tensor) -> None:
        """Point 'open' along a one-logit classifier's weight and 'closed' opposite, so the new head
        starts with the old decision direction instead of chance."""
        direction = F.normalize(linear_weight.reshape(-1).float(), dim=0)
        with torch.no_grad():
            self.weight.copy_(torch.stack([-direction, direction]))

    def inference_form(self) -> nn.Module:
        """The margin-free logit with the class weights folded into one constant direction (for export):
        s * (cos_open - cos_closed) = <e / |e|, s * (w_open / |w_open| - w_closed / |w_closed|)>."""
        w = F.normalize(self.weight.detach().float(), dim=-1)
        return CosineLogit(self.scale * (w[1] - w[0]))


class CosineLogit(nn.Module):
    """What CosineMarginHead.logit computes, in ops OpenCV DNN reads (ReduceL2, Div, MatMul): it cannot read
    F.normalize of a constant, nor the clamp of the cosines (which only removes rounding past +-1)."""

    def __init__(self, direction: torch.Tensor):
        super().__init__()
        self.register_buffer("direction", direction.reshape(1, -1))

    def logit(self, embedding: torch.Tensor) -> torch.Tensor:
        e = embedding if embedding.dtype == torch.float32 else embedding.float()  # no Cast node in fp32 graphs
        # ReduceL2 and squeeze: OpenCV 4.14 DNN fails on the same function written as Mul/ReduceSum/Sqrt or
        # ended by Reshape(-1) (measured on a baseline+cosface export)
        unit = e / (torch.linalg.vector_norm(e, dim=-1, keepdim=True) + 1e-12)
        return F.linear(unit, self.direction).squeeze(-1)


class CosFace(CosineMarginHead):
    """cos(theta) - m on the target class."""

    def apply_margin(self, cos, labels):
        return cos - self.margin * F.one_hot(labels, 2).to(cos.dtype)


class ArcFace(CosineMarginHead):
    """cos(theta + m) on the target class, exact (gradients flow through the angle).

    Past theta = pi - m, cos(theta + m) would stop decreasing, so (as in the ArcFace paper's code)
    the target falls back to the CosFace-like cos(theta) - m*sin(m)."""

    def apply_margin(self, cos, labels):
        sin = torch.sqrt((1.0 - cos * cos).clamp_min(1e-7))
        with_margin = cos * math.cos(self.margin) - sin * math.sin(self.margin)
        fallback = cos - self.margin * math.sin(self.margin)
        target = torch.where(cos > math.cos(math.pi - self.margin), with_margin, fallback)
        one_hot = F.one_hot(labels, 2).bool()
        return torch.where(one_hot, target, cos)


def build_margin_head(method: str, in_features: int, scale: float, margin: float) -> nn.Module:
    if method == "none":
        return LinearLogit(in_features)
    return {"cosface": CosFace, "arcface": ArcFace}[method](in_features, scale, margin)
