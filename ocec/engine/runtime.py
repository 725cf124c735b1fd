"""Where and how a run computes: the device, mixed precision, and stopping on SIGINT/SIGTERM."""

from __future__ import annotations

import ctypes
import logging
import signal
import sys
from contextlib import contextmanager

import torch

from ..core.config import DEVICE_HELP
from ..core.errors import UserError

log = logging.getLogger("ocec")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: expected {DEVICE_HELP}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def amp_dtype(device: torch.device, use_amp: bool) -> torch.dtype | None:
    """fp16 on CUDA (with a GradScaler), bf16 on CPU (no scaler needed), None: float32."""
    if not use_amp:
        return None
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16; disabled, its methods pass through unchanged."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def keep_freed_memory() -> bool:
    """Have glibc serve every allocation from its heap and keep freed memory for reuse (CPU training).

    A training step allocates and frees the same activation-sized buffers every time. glibc serves
    blocks above its mmap threshold (at most 32 MiB) with a fresh mmap, and the kernel zeroes every
    page of it on first touch; at batch 1024 (67 MB activations) that doubled the per-image cost on
    2 CPU cores (880 vs 1,930 img/s for the same model; bench/bench_train.py). This is what PyTorch's
    CPU performance guide gets from jemalloc/tcmalloc, without a native dependency. The decoded
    images are memory-mapped files, not malloc'ed, so keeping freed heap memory costs little.
    Returns False where it does not apply (not Linux/glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop finishes its current step, then saves and stops."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("signal %d received: finishing the current step, then saving a resumable checkpoint", signum)


@contextmanager
def stop_signals():
    """Route SIGINT/SIGTERM to a StopFlag for the duration of the block."""
    flag = StopFlag()
    previous = {s: signal.signal(s, flag) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
