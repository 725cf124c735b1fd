"""Running a model over uint8 images without augmentation: logits, embeddings, and a split's metrics."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import UserError
from ..core.metrics import best_threshold, binary_report, fisher_ratio
from ..core.progress import progress
from ..data.dataset import Split
from ..data.sampling import to_float
from ..models.model import OcecModel
from .distributed import ONE_PROCESS, World, gather_rows
from .runtime import autocast


def eval_batch_size(batch_size: int, device: torch.device) -> int:
    """Images per forward pass when a training run evaluates. A GPU wants large batches (at least 1024),
    a CPU does not:
    at 256 it evaluates 10.4-11.0k img/s against 9.0-9.1k at 1024 (baseline model, 2 cores), and 1024
    would raise the training run's peak RSS by 0.55 GiB, since freed memory is kept (keep_freed_memory)."""
    return 256 if device.type == "cpu" else max(batch_size, 1024)


@torch.inference_mode()
def predict_batches(
    model: OcecModel, batches, *, device: torch.device, amp_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Margin-free logits and embeddings (float32, CPU) for an iterable of uint8 batches, in eval mode."""
    model.eval()
    logits, embeddings = [], []
    for batch in batches:
        x = to_float(batch, device)
        with autocast(device, amp_dtype):
            emb = model.embed(x)
            logit = model.margin_head.logit(emb)
        logits.append(logit.float().cpu())
        embeddings.append(emb.float().cpu())
    if not logits:
        return torch.empty(0), torch.empty(0, model.head.out_features)
    return torch.cat(logits), torch.cat(embeddings)


def predict_split(
    model: OcecModel,
    split: Split,
    *,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    desc: str = "eval",
    world: World = ONE_PROCESS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and embeddings of every image of a split, in order, `batch_size` at a time.
    With several processes each predicts positions rank::world and all receive every row."""
    size = batch_size
    mine = torch.arange(world.rank, len(split), world.size)
    batches = (split.take(mine[start : start + size]) for start in range(0, len(mine), size))
    batches = progress(batches, total=-(-len(mine) // size), desc=desc, unit="batch")
    logits, embeddings = predict_batches(model, batches, device=device, amp_dtype=amp_dtype)
    if not world.distributed:
        return logits, embeddings
    return tuple(gather_rows(world, rows.to(device), len(split)).cpu() for rows in (logits, embeddings))


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
    world: World = ONE_PROCESS,
) -> tuple[dict, np.ndarray]:
    """Margin-free BCE loss, the classification report and the Fisher ratio of one split, and its probabilities.
    With several processes each predicts a share and all compute the same report over the whole split."""
    logits, embeddings = predict_split(
        model, split, batch_size=batch_size, device=device, amp_dtype=amp_dtype, desc=desc, world=world
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
    report["best_threshold"], report["best_f1"] = best_threshold(labels.numpy(), probs)
    report["fisher"] = fisher_ratio(embeddings, labels)
    return report, probs
