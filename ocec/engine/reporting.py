"""Optional per-epoch outputs: TensorBoard scalars and diagnostic plots (confusion matrix, ROC).

Both depend on optional extras; `check_optional` fails with a one-line hint before any work
when a requested extra is not installed.
"""

from __future__ import annotations

import logging
import numbers
from pathlib import Path


from ..core.errors import UserError
from ..core.progress import fmt

log = logging.getLogger("ocec")


def epoch_row(epoch: int, metrics: dict, lrs: dict, *, seconds: float, wall_seconds: float, seen: int) -> dict:
    """One history row: every metric of every split as <split>_<metric>, each group's LR, timings."""
    row = {"epoch": epoch}
    for split_name, values in metrics.items():
        row.update({f"{split_name}_{k}": v for k, v in values.items()})
    row.update({f"lr_{g}": v for g, v in lrs.items()})
    row["seconds"] = round(seconds, 3)
    row["wall_seconds"] = round(wall_seconds, 3)  # training and evaluation
    row["images_per_s"] = round(seen / seconds, 1) if seconds > 0 else None
    return row


def epoch_line(row: dict, epochs: int, improved: bool) -> str:
    """The log line of an epoch, from its history row."""
    text = f"epoch {row['epoch']}/{epochs} train loss {fmt(row['train_loss'])} f1 {fmt(row['train_f1'])}"
    if "val_loss" in row:
        text += f" | val loss {fmt(row['val_loss'])} f1 {fmt(row['val_f1'])}"
        if row.get("val_best_threshold") is not None:
            text += f" ({fmt(row['val_best_f1'])} at {row['val_best_threshold']:.2f})"
        text += f" auc {fmt(row['val_roc_auc'], 3)}"
        text += f" fisher {fmt(row['val_fisher'], 3)}"
    if "extra_val_f1" in row:
        text += f" | extra_val f1 {fmt(row['extra_val_f1'])}"
    text += " | lr " + " ".join(f"{k[3:]} {v:.2e}" for k, v in row.items() if k.startswith("lr_"))
    text += f" | {row['seconds']:.1f}s {row['images_per_s'] or 0:.0f} img/s"
    return text + (" [best]" if improved else "")


def check_optional(tensorboard: bool, diagnostics: bool) -> None:
    if tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install 'ocec[tensorboard]'") from None
    if diagnostics:
        from ..core.plots import require_matplotlib

        require_matplotlib("--save_diagnostics")


class Reporter:
    def __init__(self, run_dir: Path, tensorboard: bool, diagnostics: bool):
        check_optional(tensorboard, diagnostics)
        self.run_dir, self.diagnostics, self.writer = run_dir, diagnostics, None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            logdir = run_dir / "tensorboard"
            self.writer = SummaryWriter(str(logdir))
            log.info("tensorboard: view with  tensorboard --logdir %s", logdir)

    def epoch_end(self, row: dict, val_labels, val_probs) -> None:
        epoch = row["epoch"]
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                    prefix, _, name = key.partition("_")
                    self.writer.add_scalar(f"{prefix}/{name}" if name else key, value, epoch)
            self.writer.flush()
        if self.diagnostics and val_labels is not None:
            from ..core.plots import save_diagnostics

            save_diagnostics(self.run_dir / "diagnostics", epoch, val_labels, val_probs)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
