"""Several processes under `torchrun` (PyTorch DistributedDataParallel): rank and world size from the
environment torchrun sets, the process group (nccl on CUDA, gloo on CPU), and the few collective
operations the trainer needs. In a single process every function here is a no-op, so the trainer has
one code path.

The contract, as DistributedSampler's: each epoch's seeded order (the same on every rank) is padded to a
multiple of the world size by repeating its first samples; each step's global batch of --batch_size
samples is cut into equal shards, one per rank; gradients are averaged by DDP; validation predictions
are gathered from all ranks, so every rank computes the same metrics and takes the same decisions.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..core.errors import PeerFailed, UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Only the main process writes logs, history, checkpoints and the decode cache."""
        return self.rank == 0

    @property
    def first_on_machine(self) -> bool:
        """LOCAL_RANK 0: decodes (or verifies) its machine's cache, which other machines may not share."""
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


ONE_PROCESS = World()


def world_from_environment() -> World:
    return World(
        int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    )


def start(world: World, device_name: str) -> str:
    """Join the process group (once); -> the device name this rank trains on (its LOCAL_RANK's GPU)."""
    if not world.distributed:
        return device_name
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        if torch.cuda.device_count() <= world.local_rank:
            raise UserError(f"torchrun: LOCAL_RANK {world.local_rank} has no GPU ({torch.cuda.device_count()} present)")
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        # The others wait while the main process decodes and caches the data (35 s for 400k rows on 2 cores;
        # millions of rows on a slow shared filesystem can pass nccl's 10-minute default).
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
    return f"cuda:{world.local_rank}" if cuda else "cpu"


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def broadcast(world: World, value):
    """The main process's `value`, on every rank (any picklable object)."""
    if not world.distributed:
        return value
    box = [value if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_first(world: World, work: Callable, *, then_others: bool = True):
    """`work()` on the main process, then (`then_others`) on the others: the main writes the decode cache
    or the run folder, the others then read it. Without `then_others` every process gets the main's result.
    A UserError in any process stops every process (the one that failed prints it), where the others
    would otherwise wait for a peer that is gone, and die with a traceback."""
    if not world.distributed:
        return work()
    result, error = _attempt(work) if world.main else (None, None)
    _stop_together(error, broadcast(world, error is not None))
    if not then_others:
        return broadcast(world, result)
    if not world.main:
        result, error = _attempt(work)
    _stop_together(error, any(gather_objects(world, error is not None)))
    return result


def machine_first(world: World, work: Callable[[bool], object]):
    """`work(first_on_machine)` in three turns: the main process; then the first process of every other
    machine; then the rest. Each machine thus decodes its own cache once, as machines without a shared
    filesystem need (with a shared one the second turn finds the main's entry and only verifies it), and
    the other processes of a machine memory-map what their machine's first process wrote and checked.
    A UserError in any turn stops every process, as in main_first."""
    if not world.distributed:
        return work(True)
    result = None
    for mine in (world.main, world.first_on_machine and not world.main, not world.first_on_machine):
        result, error = _attempt(lambda: work(world.first_on_machine)) if mine else (result, None)
        _stop_together(error, any(gather_objects(world, error is not None)))
    return result


def _attempt(work: Callable) -> tuple:
    try:
        return work(), None
    except UserError as exc:
        return None, exc


def _stop_together(error: UserError | None, anyone_failed: bool) -> None:
    if error is not None:
        raise error
    if anyone_failed:
        raise PeerFailed("another process failed")


def gather_objects(world: World, value) -> list:
    if not world.distributed:
        return [value]
    out = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def all_sum(world: World, tensor: torch.Tensor) -> torch.Tensor:
    """In place: the sum over ranks."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_agree(world: World, flag: torch.Tensor) -> torch.Tensor:
    """A bool flag that holds on every rank (in place on an int copy; no host read)."""
    if not world.distributed:
        return flag
    value = flag.to(torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value.bool()


def agreed_signal(world: World, signum: int | None, device: torch.device) -> int | None:
    """The stop signal some rank received, or None: every rank stops at the same step (reads the result:
    call it where the loop may wait)."""
    if not world.distributed:
        return signum
    value = torch.tensor([signum or 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item()) or None


def average_buffers(world: World, module: nn.Module) -> None:
    """Each BatchNorm running statistic averaged over the ranks (each saw only its shards), so every rank
    validates and saves the same model. With --sync_bn they are already equal."""
    if world.distributed:
        for buffer in module.buffers():
            if buffer.is_floating_point():
                all_sum(world, buffer).div_(world.size)


def pad_order(order: torch.Tensor, world: World) -> torch.Tensor:
    """An epoch's order padded to a multiple of the world size with its first samples (as DistributedSampler)."""
    extra = (-len(order)) % world.size
    return torch.cat([order, order[:extra]]) if extra else order


def shard_of(batch: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's equal share of a global batch."""
    size = len(batch) // world.size
    return batch[world.rank * size : (world.rank + 1) * size]


def gather_rows(world: World, local: torch.Tensor, total: int) -> torch.Tensor:
    """Rows predicted by each rank for positions rank::world -> all `total` rows in order, on every rank."""
    if not world.distributed:
        return local
    per_rank = -(-total // world.size)
    padded = torch.zeros((per_rank, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    pieces = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(pieces, padded)
    interleaved = torch.stack(pieces, dim=1).reshape(per_rank * world.size, *local.shape[1:])
    return interleaved[:total]


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(sum) that autograd sees through: the gradient of a sum over ranks is the sum of the ranks'
    gradients. (torch.distributed.nn.functional.all_reduce does this but is deprecated in torch 2.14, and its
    successor is private.)"""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm for processes on CPUs (gloo): torch's runs only on GPUs (and DDP refuses it on CPU
    modules). The batch statistics are summed over the ranks by an autograd-aware all_reduce, whose
    backward sums the gradients the same way, so the result is BatchNorm over the global batch, as with one
    process. For the model's BatchNorms (affine, tracking running statistics), 1d or 2d."""

    local = False  # set by local_batchnorm()

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()) or GlooSyncBatchNorm.local:
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], (1, x.shape[1]) + (1,) * (x.dim() - 2)
        xf = x.float()
        n = float(x.numel() // x.shape[1] * dist.get_world_size())  # the shards are equal
        mean = _SumOverRanks.apply(xf.sum(dims)) / n
        centred = xf - mean.view(shape)  # two passes, as torch's: E[x^2] - E[x]^2 loses digits
        var = _SumOverRanks.apply((centred * centred).sum(dims)) / n
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean, momentum)
            self.running_var.lerp_(var * (n / (n - 1)), momentum)
        y = centred * (torch.rsqrt(var + self.eps) * self.weight).view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Each BatchNorm of `module` replaced, in place, by one holding the same parameters and buffers."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            synced = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            synced.weight, synced.bias = module.weight, module.bias
            synced.running_mean, synced.running_var = module.running_mean, module.running_var
            synced.num_batches_tracked = module.num_batches_tracked
            return synced.train(module.training)
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """--sync_bn, in place: every BatchNorm computes its statistics over the global batch. The modules keep
    their parameters and buffers (the optimizer's and the checkpoint's), so checkpoints load without it."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return GlooSyncBatchNorm.convert(model)


@contextmanager
def local_batchnorm():
    """Each process's BatchNorm statistics from its own batches, while every rank runs the same batches
    (precise BN): summed over the ranks they would count each image once per rank, which leaves the mean
    but not the unbiased variance's n/(n-1). torch's CUDA SyncBatchNorm has no such switch; there the
    running variance differs from one process's by a factor (w-1)/(w*n) at w processes and n images a
    batch: 0.05% at batch 1024 on 2 GPUs."""
    GlooSyncBatchNorm.local = True
    try:
        yield
    finally:
        GlooSyncBatchNorm.local = False


class TrainStep(nn.Module):
    """The training forward (embedding -> margin loss) as one module, so DistributedDataParallel can wrap it:
    DDP synchronises gradients only for computations that run through its forward."""

    def __init__(self, model: nn.Module, kd_alpha: float = 0.0, kd_temperature: float = 1.0):
        super().__init__()
        self.model, self.kd_alpha, self.kd_temperature = model, kd_alpha, kd_temperature

    def forward(self, x, y, class_weight, teacher_logit=None):
        embedding = self.model.embed(x)
        loss, logit = self.model.margin_head.training_loss(embedding, y, class_weight)
        if teacher_logit is None:
            return loss, logit
        # --teacher: the soft target on the margin-free logit (finetune/distill.py says why this form)
        t = self.kd_temperature
        student = self.model.margin_head.logit(embedding).float() / t
        soft = nn.functional.binary_cross_entropy_with_logits(student, torch.sigmoid(teacher_logit / t)) * t * t
        return (1.0 - self.kd_alpha) * loss + self.kd_alpha * soft, logit


# Buffers (BatchNorm statistics) are averaged once per epoch (average_buffers), not broadcast before every
# forward. torch 2.14 renamed the option; older releases (>= 2.4 supported) know only the old name.
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


def wrap(step: TrainStep, device: torch.device) -> nn.Module:
    """DDP over the parameters that train now (it starts from rank 0's weights and buffers). Rebuilt when a
    stage freezes or releases parameters: DDP registers only those with requires_grad at construction."""
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(step, device_ids=device_ids, **_NO_FORWARD_BUFFER_SYNC)
