"""What fine-tuning adds to training: BatchNorm adaptation, the zero-shot report, weight EMA and the
L2-SP anchor. Each is off unless its flag asks for it, and then changes nothing else.

- BatchNorm adaptation (AdaBN, Li et al. 2016): model A's running statistics describe dataset A; on a
  shifted B they misplace every activation, so A ranks B's images well but thresholds them badly.
  Re-estimating them on B's training images (no augmentation, no gradient) fixes that before the first
  step. `engine.batchnorm.adapt_batchnorm` does the pass (a cumulative average over the images given).
- Weight EMA: `torch.optim.swa_utils.AveragedModel` with an EMA average, buffers included (as timm's
  ModelEmaV3); validation, best-checkpoint selection, eval and export use the averaged weights.
- L2-SP (Li et al. 2018): the backbone is pulled towards the pretrained weights instead of towards zero.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..core.progress import fmt
from ..data.dataset import Split
from ..engine.batchnorm import BN_ADAPT_IMAGES, adapt_batchnorm, has_batchnorm
from ..engine.distributed import ONE_PROCESS, World
from ..engine.inference import eval_batch_size, evaluate_split
from ..models.model import OcecModel

log = logging.getLogger("ocec")


def zero_shot_report(
    model: OcecModel,
    train: Split,
    val: Split | None,
    *,
    adapt: bool,
    batch_size: int,
    device: torch.device,
    seed: int,
    world: World = ONE_PROCESS,
) -> dict:
    """Model A on B's val split before any step: as loaded, and after BatchNorm adaptation (which is kept
    only when `adapt`, else measured on a copy). The user sees the domain gap before spending a GPU-day."""
    report = {}
    evaluate = dict(batch_size=eval_batch_size(batch_size, device), device=device, desc="zero-shot", world=world)
    if val is not None:
        before, _ = evaluate_split(model, val, **evaluate)
        report["before"] = {k: before[k] for k in ("f1", "roc_auc", "loss")}
    if not has_batchnorm(model):  # convnext with a token-mixer head normalises with LayerNorm only
        report["bn_adapt_images"] = 0
        if val is not None:
            b = report["before"]
            log.info(
                "zero-shot on the val split: F1 %s ROC-AUC %s | no BatchNorm adaptation: this model has no "
                "BatchNorm layers (LayerNorm normalises each image by itself)",
                fmt(b["f1"]),
                fmt(b["roc_auc"], 3),
            )
            report["regime"] = log_regime(b["roc_auc"], len(train))
        return report
    target = model if adapt else copy.deepcopy(model)
    images = adapt_batchnorm(target, train, batch_size=batch_size, device=device, max_images=BN_ADAPT_IMAGES, seed=seed)
    report["bn_adapt_images"] = images
    if val is not None:
        after, _ = evaluate_split(target, val, **evaluate)
        report["after_bn_adapt"] = {k: after[k] for k in ("f1", "roc_auc", "loss")}
        b, a = report["before"], report["after_bn_adapt"]
        log.info(
            "zero-shot on the val split: F1 %s ROC-AUC %s | after BatchNorm adaptation on %d train images: "
            "F1 %s ROC-AUC %s (%s)",
            fmt(b["f1"]),
            fmt(b["roc_auc"], 3),
            images,
            fmt(a["f1"]),
            fmt(a["roc_auc"], 3),
            "applied: --bn_adapt" if adapt else "not applied; --bn_adapt would",
        )
        report["regime"] = log_regime(a["roc_auc"], len(train))
    elif adapt:
        log.info("BatchNorm statistics re-estimated on %d train images (--bn_adapt)", images)
    return report


def log_regime(auc: float | None, labelled: int) -> str:
    name, advice = shift_regime(auc, labelled)
    log.info("regime: %s (A's ROC-AUC on B %s, %d labelled train rows): %s", name, fmt(auc, 3), labelled, advice)
    return name


# The regime the zero-shot report names, from two things known before the first step: how well model A's
# features separate B (ROC-AUC on B's val split after BatchNorm adaptation) and how many labelled train rows B
# has. Boundaries from bench/transfer.py's five cases (docs/finetune.md, section 4): A's ROC-AUC was 0.63-0.64
# on the hard style c, 0.89-0.90 on style b and 0.92 on real eye crops; 558 to 1,000 labels counted as few,
# 4,800 and more as many.
FAR_SHIFT_AUC = 0.75
FEW_LABELS = 2000
REGIMES = {
    ("far", "few"): "A's features barely separate B, yet with few labels A's start still gained in our "
    "measurements; use pseudo-labels only if they gain on your val split (docs/finetune.md, section 4)",
    ("far", "many"): "A's features barely separate B and B has many labels: A's start gains little there; "
    "give the run a patient schedule (--plateau_patience 6), train a bigger teacher on B and distil it on blended "
    "images (--teacher T --kd_mixup 0.5), and compare with a run without --pretrain (docs/finetune.md, section 4)",
    ("near", "few"): "A's features carry over and B has few labels: fine-tuning usually helps most here; "
    "pseudo-label the unlabelled rows (ocec pseudo-label) and keep them only if val F1 gains "
    "(docs/finetune.md, section 4)",
    ("near", "many"): "A's features carry over and B has many labels: fine-tuning still gains a little, and "
    "A's start saves epochs (docs/finetune.md, section 4)",
}


def shift_regime(auc: float | None, labelled: int) -> tuple[str, str]:
    """-> (name, what to try), e.g. ('far shift, many labels', '...'). An undefined AUC counts as far."""
    far = "far" if auc is None or auc != auc or auc < FAR_SHIFT_AUC else "near"
    few = "few" if labelled < FEW_LABELS else "many"
    return f"{far} shift, {few} labels", REGIMES[far, few]


def weight_ema(model: OcecModel, decay: float) -> AveragedModel:
    """An exponential moving average of the weights and buffers: ema = decay * ema + (1 - decay) * weights."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


class L2SP:
    """Adds alpha * (w - w_pretrained) to the gradient of every backbone weight (the gradient of
    alpha/2 * ||w - w_pretrained||^2). Added to the gradient, not the loss: the reported loss stays the
    classification loss, comparable between runs."""

    def __init__(self, model: OcecModel, alpha: float, anchor: dict | None = None):
        self.alpha = alpha
        self.pairs = []
        for name, param in model.named_parameters():
            if name.startswith("backbone."):
                start = anchor[name] if anchor is not None else param.detach()
                self.pairs.append((name, param, start.to(param.device).clone()))

    def add_to_gradients(self) -> None:
        for _, param, start in self.pairs:
            if param.grad is not None:
                param.grad.add_(param.detach() - start, alpha=self.alpha)

    def state_dict(self) -> dict:
        return {name: start.cpu() for name, _, start in self.pairs}


def hard_weights(losses: torch.Tensor, cap: float = 10.0) -> torch.Tensor:
    """Sampling weights in proportion to each sample's last loss, bounded to [median / cap, median * cap]
    so a few mislabelled images cannot take over an epoch; samples never seen count as the median."""
    known = losses[~torch.isnan(losses)]
    middle = float(known.quantile(0.5)) if len(known) else 1.0
    middle = middle if np.isfinite(middle) and middle > 0 else 1.0
    return losses.nan_to_num(middle).clamp(middle / cap, middle * cap)
