"""Progress inside one epoch: its sample order and what each step left behind (loss, logits, whether it
was taken), in buffers allocated once per epoch on the training device."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.sampling import steps_per_epoch
from .distributed import ONE_PROCESS, World, all_sum, pad_order, shard_of


@dataclass
class EpochState:
    """Progress inside an epoch, in buffers allocated once per epoch on the training device: the loop
    never waits for the device (except to check skipped steps every `check_every` steps), and keeps no
    per-step objects alive (small tensors kept for an epoch between each step's large short-lived ones
    fragmented the heap: +4 MB per step). Interrupt checkpoints save it with the augmentation
    generator's state, so a stopped epoch resumes mid-way with the same statistics.

    Under torchrun every rank holds the same (padded) order and steps through the same global batches of
    `batch_size`, training on its shard of each; each fills in only its own logits and losses, which
    `combine_ranks` sums so every rank then holds the whole epoch's."""

    order: torch.Tensor  # the epoch's pool indices
    batch_size: int  # the global batch
    aug_gen: torch.Generator
    world: World = ONE_PROCESS
    step: int = 0
    loss_sum: torch.Tensor | None = None  # float64, over the images of steps taken
    kept: torch.Tensor | None = None  # images of steps taken
    logits: torch.Tensor | None = None  # one per sample of `order`, filled as the steps go
    taken: torch.Tensor | None = None  # one per step: the step was taken (not skipped)
    unchecked: list = field(default_factory=list)  # per step since the last check: 0 ok, 1 loss, 2 gradient non-finite

    def __post_init__(self):
        device = self.aug_gen.device
        self.order = pad_order(self.order, self.world)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.kept = torch.zeros((), dtype=torch.long, device=device)
        self.logits = torch.zeros(len(self.order), device=device)
        self.taken = torch.zeros(self.total_steps, dtype=torch.bool, device=device)

    @property
    def total_steps(self) -> int:
        return steps_per_epoch(len(self.order), self.batch_size, self.world.size)

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    @property
    def seen(self) -> int:
        """Images processed so far, skipped steps included."""
        return min(self.step * self.batch_size, len(self.order))

    def batch(self) -> torch.Tensor:
        """This rank's samples of the step's global batch."""
        return shard_of(self.order[self.seen : self.seen + self.batch_size], self.world)

    def add(self, loss: torch.Tensor, logit: torch.Tensor, loss_ok, grad_ok) -> None:
        """Record a step of this rank's shard; `loss_ok`, `grad_ok` are agreed by all ranks."""
        taken = loss_ok & grad_ok
        start = self.seen + self.world.rank * len(logit)
        self.logits[start : start + len(logit)] = logit.detach().float()
        self.taken[self.step] = taken
        self.loss_sum += torch.where(taken, loss.detach().double() * len(logit), 0.0)
        self.kept += taken.long() * len(logit)
        self.unchecked.append(torch.where(loss_ok, torch.where(grad_ok, 0, 2), 1))
        self.step += 1

    def combine_ranks(self) -> None:
        """Every rank's logits and losses on every rank (once, at the end of the epoch or on a stop)."""
        for buffer in (self.logits, self.loss_sum, self.kept):
            all_sum(self.world, buffer)

    def mean_loss(self) -> float:
        return float(self.loss_sum) / max(1, int(self.kept))

    def taken_samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool indices, logits) of the samples of the steps taken so far (skipped steps left out)."""
        n = self.seen
        taken = self.taken[torch.arange(n, device=self.taken.device) // self.batch_size]
        return self.order[:n][taken], self.logits[:n][taken]

    def outputs(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, labels) of the samples of the steps taken so far, on the CPU; `labels` of the pool."""
        order, logits = self.taken_samples()
        return logits.cpu(), labels[order.to(labels.device)].cpu()

    def to_dict(self) -> dict:
        loss_sum = self.loss_sum.cpu()
        logits, taken = self.logits[: self.seen].cpu(), self.taken[: self.step].cpu()
        return {"step": self.step, "kept": int(self.kept), "loss_sum": loss_sum, "logits": logits, "taken": taken}

    def load(self, data: dict) -> "EpochState":
        """A stopped epoch's state (saved after `combine_ranks`): held by the main rank alone, so that the
        next `combine_ranks` counts it once."""
        self.step = data["step"]
        self.taken[: len(data["taken"])] = data["taken"].to(self.taken.device)
        if self.world.main:
            self.kept.fill_(data["kept"])
            self.loss_sum.copy_(data["loss_sum"])
            self.logits[: len(data["logits"])] = data["logits"].to(self.logits.device)
        return self
