"""Knowledge distillation (`--teacher`): a bigger model's soft predictions as a second training target.

The teacher (one checkpoint or run, or several: an ensemble averages their logits, as MEAL V2) sees
exactly the augmented batch the student sees ("a good teacher is patient and consistent", Beyer et al.
2022), in eval mode under inference mode, in the student's AMP dtype. It may be any architecture and input
size ocec builds: the batch is resized for it inside. The loss is

    (1 - kd_alpha) * margin loss  +  kd_alpha * T^2 * BCE(sigmoid(z / T), sigmoid(t / T))

on the student's margin-free logit z and the teacher's t (the binary form of Hinton et al.'s softened
cross-entropy; T^2 keeps the gradient scale independent of T).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from ..engine.runtime import autocast
from .pretrained import Snapshot, choose_best, load_pretrained_state

log = logging.getLogger("ocec")
LABEL_MAP = {0: "closed", 1: "open"}


def read_teachers(paths: list[str]) -> list[Snapshot]:
    """Each --teacher argument's best checkpoint (a run folder, file or glob each), refused when it does not
    answer the same question (0 closed, 1 open)."""
    snaps = []
    for path in paths:
        snap, _ = choose_best([path], "--teacher")
        labels = {int(k): str(v).lower() for k, v in (snap.label_map or LABEL_MAP).items()}
        if labels != LABEL_MAP:
            raise UserError(
                f"--teacher {snap.path}: its label map {labels} is not 0 closed, 1 open; a teacher must answer "
                "the student's question"
            )
        snaps.append(snap)
    return snaps


class Teacher:
    """Frozen eval-mode models whose averaged logit is the soft target; `seconds` counts their cost."""

    def __init__(self, snaps: list[Snapshot], device: torch.device, amp_dtype: torch.dtype | None):
        from ..models.model import build_model

        self.models: list[nn.Module] = []
        for snap in snaps:
            model = build_model(snap.model_config)
            load_pretrained_state(model, snap)
            self.models.append(model.to(device).eval().requires_grad_(False))
        self.device, self.amp_dtype, self.seconds = device, amp_dtype, 0.0
        self._events: list = []  # on CUDA: (start, end) per step, read at the epoch's end without a sync per step
        self.names = [f"{s.model_config.arch_variant}/{s.model_config.resolved_head} ({s.path.name})" for s in snaps]

    def describe(self) -> str:
        params = sum(p.numel() for m in self.models for p in m.parameters())
        return f"teacher: {len(self.models)} model(s), {params} parameters: {', '.join(self.names)}"

    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        cuda = self.device.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        started = time.perf_counter()
        total = None
        for model in self.models:
            size = tuple(model.config.image_size)
            seen = x if tuple(x.shape[-2:]) == size else F.interpolate(x, size, mode="bilinear", antialias=True)
            with autocast(self.device, self.amp_dtype):
                logit = model(seen).float()
            total = logit if total is None else total + logit
        if cuda:
            end.record()
            self._events.append((start, end))
        else:
            self.seconds += time.perf_counter() - started
        return total / len(self.models)

    def take_seconds(self) -> float:
        """Seconds the teacher took since the last call (one device sync on CUDA, at the epoch's end)."""
        if self._events:
            self._events[-1][1].synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self._events) / 1000.0
            self._events.clear()
        seconds, self.seconds = self.seconds, 0.0
        return seconds
