"""Which samples each step trains on, and how a batch of them reaches the device.

Every random stream of epoch e is seeded from (seed, e), so a run resumed from any checkpoint
replays exactly what an uninterrupted run would have done (on the same machine).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

log = logging.getLogger("ocec")

# Random streams of one epoch, each seeded by epoch_seed(seed, epoch, stream).
ORDER_STREAM, AUGMENT_STREAM, DROPOUT_STREAM = 1, 2, 3


def epoch_seed(seed: int, epoch: int, stream: int, rank: int = 0) -> int:
    """`rank`: a process's own stream (augmentation, dropout) under torchrun; the order is shared (rank 0)."""
    return (seed * 1_000_003 + epoch * 7919 + stream + rank * 2**32) % (2**63 - 1)


def epoch_generator(
    seed: int, epoch: int, stream: int, device: torch.device | str = "cpu", rank: int = 0
) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(epoch_seed(seed, epoch, stream, rank))


def draw(labels: torch.Tensor, count: int, generator: torch.Generator, balanced: bool) -> torch.Tensor:
    """`count` indices into `labels`: a permutation (repeated if needed), or class-balanced with replacement."""
    if count <= 0:
        return torch.empty(0, dtype=torch.long)
    if balanced:
        per_class = torch.bincount(labels, minlength=2).clamp_min(1).double()
        return torch.multinomial(1.0 / per_class[labels], count, replacement=True, generator=generator)
    reps = math.ceil(count / len(labels))
    return torch.cat([torch.randperm(len(labels), generator=generator) for _ in range(reps)])[:count]


def epoch_order(
    primary_labels: torch.Tensor,
    mix_labels: torch.Tensor | None,
    mix_ratio: float,
    balanced: bool,
    generator: torch.Generator,
    hard: tuple[float, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Indices into cat(primary, mix) for one epoch: len(primary) samples, round(mix_ratio * len) of
    them from the mix pool, shuffled together. `hard` = (share, weights): that share of the primary
    samples is drawn with replacement in proportion to `weights` (hard-example mining)."""
    total = len(primary_labels)
    n_mix = round(mix_ratio * total) if mix_labels is not None and len(mix_labels) else 0
    n_hard = round(hard[0] * (total - n_mix)) if hard is not None else 0
    primary = draw(primary_labels, total - n_mix - n_hard, generator, balanced)
    mined = torch.multinomial(hard[1], n_hard, replacement=True, generator=generator) if n_hard else primary[:0]
    mixed = draw(mix_labels, n_mix, generator, balanced) + total if n_mix else primary[:0]
    order = torch.cat([primary, mined, mixed])
    return order[torch.randperm(len(order), generator=generator)]


def class_weight(open_share: float, balance: str) -> torch.Tensor | None:
    """Per-class loss weights [closed, open] that make both classes count equally (--balance pos_weight)."""
    if balance != "pos_weight":
        return None
    share = min(max(open_share, 1e-3), 1 - 1e-3)
    return torch.tensor([0.5 / (1 - share), 0.5 / share], dtype=torch.float32)


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Full batches plus the remainder, unless the remainder gives a process one sample (BatchNorm cannot
    train on it). With several processes the samples are first padded to a multiple of their number."""
    padded = num_samples + (-num_samples) % world_size
    return padded // batch_size + (1 if (padded % batch_size) // world_size >= 2 else 0)


def to_float(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 NCHW -> float in [0, 1] on `device`, channels-last (faster convolutions on CPU and GPU;
    the layout changes while the batch is still uint8, a quarter of the bytes)."""
    x = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return x.float().div_(255.0)


@dataclass
class TrainingPool:
    """The images an epoch samples from. Pool indices run over the primary rows (the train split, then
    --extra_train_root's), then the mixed-in rows (--mix_data_root); each part is gathered from its own
    dataset's images (no copies are joined). Holds the labels and the loss's class weights. On CUDA the
    pool is copied to the GPU when it fits."""

    parts: list[tuple[torch.Tensor, torch.Tensor]]  # (a dataset's images, its rows in the pool), in pool order
    labels: torch.Tensor
    primary: int  # pool indices below this are primary rows, the rest mixed-in ones
    class_weight: torch.Tensor | None

    @classmethod
    def build(cls, primary: list, mix, *, mix_ratio: float, balance: str, device: torch.device) -> "TrainingPool":
        """`primary`: the splits every epoch covers; `mix`: the split an epoch takes `mix_ratio` of."""
        splits = primary + ([mix] if mix is not None else [])
        count = sum(len(s) for s in primary)
        open_share = float(torch.cat([s.labels for s in primary]).double().mean()) * (1 - mix_ratio)
        if mix is not None:
            open_share += float(mix.labels.double().mean()) * mix_ratio
        weight = class_weight(open_share, balance)
        labels = torch.cat([s.labels for s in splits])
        parts = [(s.images, s.rows) for s in splits]
        if device.type == "cuda" and _fits_on(device, len(labels) * splits[0].images[0].numel()):
            resident = torch.cat([_to_device(s, device) for s in splits])
            parts = [(resident, torch.arange(len(resident), device=device))]
        return cls(parts, labels.to(parts[0][0].device), count, None if weight is None else weight.to(device))

    @property
    def device(self) -> torch.device:
        return self.parts[0][0].device

    @property
    def primary_labels(self) -> torch.Tensor:
        return self.labels[: self.primary].cpu()

    @property
    def mix_labels(self) -> torch.Tensor | None:
        return self.labels[self.primary :].cpu() if len(self.labels) > self.primary else None

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 images [len(idx), 3, H, W] of pool indices `idx` (on the pool's device)."""
        if len(self.parts) == 1:
            images, rows = self.parts[0]
            return images[rows[idx]]
        images0 = self.parts[0][0]
        out = torch.empty((len(idx), *images0.shape[1:]), dtype=images0.dtype, device=images0.device)
        start = 0
        for images, rows in self.parts:
            inside = (idx >= start) & (idx < start + len(rows))
            out[inside] = images[rows[idx[inside] - start]]
            start += len(rows)
        return out


def _fits_on(device: torch.device, nbytes: int) -> bool:
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes < 0.5 * free:
        return True
    log.info("training images (%.1f GiB) stay in host memory; batches are copied per step", nbytes / 2**30)
    return False


def _to_device(split, device: torch.device, chunk: int = 65536) -> torch.Tensor:
    """A split's images on `device`, copied in chunks (host memory never holds the whole split twice)."""
    out = torch.empty((len(split), *split.images.shape[1:]), dtype=torch.uint8, device=device)
    for start in range(0, len(split), chunk):
        out[start : start + chunk] = split.take(slice(start, start + chunk)).to(device)
    return out
