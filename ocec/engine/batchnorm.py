"""BatchNorm running statistics: re-estimated on a sample of images (the adapted start of a fine-tune,
precise BN before validation), or frozen with their layer's parameters."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from ..data.dataset import Split
from ..data.sampling import to_float
from ..models.model import OcecModel

BN_ADAPT_IMAGES = 20_000  # statistics of 20k images are as good as of all of them, and cost seconds


def adapt_batchnorm(
    model: OcecModel, split: Split, *, batch_size: int, device: torch.device, max_images: int, seed: int
) -> int:
    """Re-estimate every BatchNorm's running statistics on up to `max_images` images of `split` (a seeded
    subset), without augmentation or gradients. Weights do not change. Returns the number of images."""
    count = min(len(split), max_images)
    positions = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    batches = (
        to_float(split.take(positions[start : start + batch_size]), device) for start in range(0, count, batch_size)
    )
    was_training = model.training
    update_bn(batches, model)
    model.train(was_training)
    return count


def freeze_batchnorm_statistics(model: nn.Module) -> None:
    """Put BatchNorm layers whose parameters are all frozen in eval mode: their running statistics
    stop updating too. Call after every `model.train()`."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()
