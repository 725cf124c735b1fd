"""Optional per-epoch outputs: TensorBoard scalars and diagnostic plots (confusion matrix, ROC).

Both depend on optional extras; `check_optional` fails with a one-line hint before any work
when a requested extra is not installed.
"""

from __future__ import annotations

import logging
import numbers
import sys
from pathlib import Path

from tqdm import tqdm

from .errors import UserError

log = logging.getLogger("ocec")


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar that stays quiet when stdout is not a terminal (log files, nohup, CI)."""
    return tqdm(iterable, disable=not sys.stdout.isatty(), leave=False, **kwargs)


def check_optional(tensorboard: bool, diagnostics: bool) -> None:
    if tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install 'ocec[tensorboard]'") from None
    if diagnostics:
        from .plots import require_matplotlib

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
            from .plots import save_diagnostics

            save_diagnostics(self.run_dir / "diagnostics", epoch, val_labels, val_probs)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
