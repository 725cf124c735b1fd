"""Running a model over uint8 images without augmentation: logits, embeddings, and a split's metrics."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data import Split
from .errors import UserError
from .metrics import binary_report, fisher_ratio
from .model import OcecModel
from .reporting import progress
from .runtime import autocast
from .sampling import to_float


@torch.inference_mode()
def predict_split(
    model: OcecModel,
    images: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    desc: str = "eval",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Margin-free logits and embeddings (float32, CPU) for uint8 images, in eval mode."""
    model.eval()
    logits, embeddings = [], []
    for start in progress(range(0, len(images), batch_size), desc=desc, unit="batch"):
        x = to_float(images[start : start + batch_size], device)
        with autocast(device, amp_dtype):
            emb = model.embed(x)
            logit = model.margin_head.logit(emb)
        logits.append(logit.float().cpu())
        embeddings.append(emb.float().cpu())
    if not logits:
        return torch.empty(0), torch.empty(0, model.head.out_features)
    return torch.cat(logits), torch.cat(embeddings)


def require_finite(logits: torch.Tensor, what: str, why: str = "the weights hold NaN or inf values") -> None:
    if not bool(torch.isfinite(logits).all()):
        raise UserError(f"{what}: outputs are not finite: {why}")


def evaluate_split(
    model: OcecModel,
    split: Split,
    *,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    desc: str = "val",
) -> tuple[dict, np.ndarray]:
    """Margin-free BCE loss, the classification report and the Fisher ratio of one split, and its probabilities."""
    logits, embeddings = predict_split(
        model, split.images, batch_size=batch_size, device=device, amp_dtype=amp_dtype, desc=desc
    )
    require_finite(
        logits,
        f"the {desc} split",
        "training diverged (the learning rate is likely too high); the best and last good checkpoints are intact",
    )
    labels = split.labels
    loss = float(F.binary_cross_entropy_with_logits(logits, labels.float())) if len(labels) else float("nan")
    probs = torch.sigmoid(logits).numpy()
    report = {"loss": loss, **binary_report(labels.numpy(), probs)}
    report["fisher"] = fisher_ratio(embeddings, labels)
    return report, probs
