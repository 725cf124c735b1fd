"""Progress inside one epoch: its sample order and what each step left behind (loss, logits, whether it
was taken), in buffers allocated once per epoch on the training device."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampling import steps_per_epoch


@dataclass
class EpochState:
    """Progress inside an epoch, in buffers allocated once per epoch on the training device: the loop
    never waits for the device (except to check skipped steps every `check_every` steps), and keeps no
    per-step objects alive (small tensors kept for an epoch between each step's large short-lived ones
    fragmented the heap: +4 MB per step). Interrupt checkpoints save it with the augmentation
    generator's state, so a stopped epoch resumes mid-way with the same statistics."""

    order: torch.Tensor  # the epoch's pool indices
    batch_size: int
    aug_gen: torch.Generator
    step: int = 0
    loss_sum: torch.Tensor | float = 0.0  # float64, over the images of steps taken
    kept: torch.Tensor | int = 0  # images of steps taken
    logits: torch.Tensor | None = None  # one per sample of `order`, filled as the steps go
    taken: torch.Tensor | None = None  # one per step: the step was taken (not skipped)
    unchecked: list = field(default_factory=list)  # per step since the last check: 0 ok, 1 loss, 2 gradient non-finite

    def __post_init__(self):
        device = self.aug_gen.device
        self.logits = torch.zeros(len(self.order), device=device)
        self.taken = torch.zeros(self.total_steps, dtype=torch.bool, device=device)

    @property
    def total_steps(self) -> int:
        return steps_per_epoch(len(self.order), self.batch_size)

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    @property
    def seen(self) -> int:
        """Images processed so far, skipped steps included."""
        return min(self.step * self.batch_size, len(self.order))

    def batch(self) -> torch.Tensor:
        return self.order[self.seen : self.seen + self.batch_size]

    def add(self, loss: torch.Tensor, logit: torch.Tensor, loss_ok, grad_ok) -> None:
        taken = loss_ok & grad_ok
        self.logits[self.seen : self.seen + len(logit)] = logit.detach().float()
        self.taken[self.step] = taken
        self.loss_sum = self.loss_sum + torch.where(taken, loss.detach().double() * len(logit), 0.0)
        self.kept = self.kept + taken.long() * len(logit)
        self.unchecked.append(torch.where(loss_ok, torch.where(grad_ok, 0, 2), 1))
        self.step += 1

    def mean_loss(self) -> float:
        return float(self.loss_sum) / max(1, int(self.kept))

    def outputs(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, labels) of the samples of the steps taken so far, on the CPU; `labels` of the pool."""
        n = self.seen
        taken = self.taken[torch.arange(n, device=self.taken.device) // self.batch_size].cpu()
        return self.logits[:n].cpu()[taken], labels[self.order[:n]].cpu()[taken]

    def to_dict(self) -> dict:
        loss_sum = torch.as_tensor(self.loss_sum, dtype=torch.float64).cpu()
        logits, taken = self.logits[: self.seen].cpu(), self.taken[: self.step].cpu()
        return {"step": self.step, "kept": int(self.kept), "loss_sum": loss_sum, "logits": logits, "taken": taken}

    def load(self, data: dict) -> "EpochState":
        device = self.aug_gen.device
        self.step, self.kept, self.loss_sum = data["step"], data["kept"], data["loss_sum"].to(device)
        self.logits[: len(data["logits"])] = data["logits"].to(device)
        self.taken[: len(data["taken"])] = data["taken"].to(device)
        return self
