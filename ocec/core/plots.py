"""Figures (optional extra `ocec[plot]`): run comparison curves and per-epoch diagnostics.

matplotlib is imported lazily with the Agg backend, so a headless server needs no display.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .errors import UserError
from .fileio import atomic_write


def require_matplotlib(flag: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(f"{flag} needs matplotlib: pip install 'ocec[plot]'") from None
    return plt


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def _series(history: list[dict], key: str) -> list[float]:
    return [np.nan if r.get(key) is None else r[key] for r in history]


def plot_runs(runs: list[tuple[str, list[dict]]], out: Path) -> tuple[Path, int]:
    """One figure: val F1, train/val loss and learning rate per epoch for every run.

    Returns the path and the number of lines drawn (for the caller's report and the tests)."""
    plt = require_matplotlib("--plot")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    lines = 0
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, history) in enumerate(runs):
        colour = colours[i % len(colours)]  # one colour per run across all panels
        epochs = [r["epoch"] for r in history]
        if any(r.get("val_f1") is not None for r in history):
            axes[0].plot(epochs, _series(history, "val_f1"), marker=".", color=colour, label=label)
            lines += 1
        axes[1].plot(epochs, _series(history, "train_loss"), linestyle="--", color=colour, label=f"{label} train")
        lines += 1
        if any(r.get("val_loss") is not None for r in history):
            axes[1].plot(epochs, _series(history, "val_loss"), color=colour, label=f"{label} val")
            lines += 1
        lr_key = "lr_backbone" if any("lr_backbone" in r for r in history) else "lr_head"
        axes[2].plot(epochs, _series(history, lr_key), color=colour, label=f"{label} {lr_key[3:]}")
        lines += 1
    for ax, title in zip(axes, ("validation F1", "loss (dashed: train)", "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[2].set_yscale("log")
    path = _save(fig, out)
    plt.close(fig)
    return path, lines


def save_diagnostics(folder: Path, epoch: int, labels, probs) -> list[Path]:
    """Confusion matrix and ROC curve of the validation split at one epoch."""
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

    plt = require_matplotlib("--save_diagnostics")
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    written = []
    fig, ax = plt.subplots(figsize=(4, 4))
    ConfusionMatrixDisplay.from_predictions(
        labels, (probs >= 0.5).astype(int), labels=[0, 1], display_labels=["closed", "open"], ax=ax, colorbar=False
    )
    ax.set_title(f"epoch {epoch}")
    written.append(_save(fig, folder / f"confusion_epoch{epoch:04d}.png"))
    plt.close(fig)
    if len(np.unique(labels)) == 2:
        fig, ax = plt.subplots(figsize=(4, 4))
        RocCurveDisplay.from_predictions(labels, probs, ax=ax, name=f"epoch {epoch}")
        written.append(_save(fig, folder / f"roc_epoch{epoch:04d}.png"))
        plt.close(fig)
    return written
