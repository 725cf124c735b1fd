"""`ocec predict`: prob_open for image files or for every row of a parquet dataset, in one CSV schema.

Columns, the same for both inputs (so one reader handles either):
  path       the image file, or the parquet file the row came from
  row        the row within that parquet file (empty for image files)
  source     the row's `source` (empty for image files and data without the column)
  prob_open  probability of "open", 6 decimals
  predicted  "open" if prob_open >= the threshold, else "closed" (the model's answer, not the truth)
  label      the row's ground truth ("open"/"closed"), only when the data has a label column
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import torch

from ..core.errors import UserError
from ..core.fileio import atomic_write
from ..core.progress import progress
from ..data.decode import decode_image_bytes
from ..engine.inference import predict_batches, require_finite
from ..engine.runtime import resolve_device
from ..finetune.pretrained import load_for_inference, resolve_threshold
from ..finetune.pseudo import file_rows, predict_dataset

log = logging.getLogger("ocec")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
NAMES = ("closed", "open")


def collect_images(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"--inputs {p}: no such file or directory")
    if not files:
        raise UserError(f"--inputs {' '.join(inputs)}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def prediction_table(paths, rows, sources, probs: np.ndarray, threshold: float, labels=None) -> pa.Table:
    columns = {
        "path": pa.array(list(paths), pa.string()),
        "row": pa.array(rows, pa.int64()),
        "source": pa.array(sources, pa.string()),
        "prob_open": pc.round(pa.array(probs.astype(np.float64)), 6),
        "predicted": pa.array([NAMES[int(p >= threshold)] for p in probs]),
    }
    if labels is not None:
        columns["label"] = pa.array([NAMES[v] if v >= 0 else None for v in labels], pa.string())
    return pa.table(columns)


def predict_images(
    checkpoint: list[str], inputs: list[str], *, threshold: float | str = 0.5, batch_size: int = 256, device="auto"
) -> pa.Table:
    """Image files, resized exactly as in training; unreadable files are skipped with a warning. Files are
    decoded and predicted one batch at a time, so a folder of any size fits in memory."""
    dev = resolve_device(device)
    model, snap, why = load_for_inference(checkpoint, dev)
    log.info("checkpoint: %s", why)
    threshold = resolve_threshold(threshold, snap)
    files = collect_images(inputs)
    kept, failed = [], []

    def decoded_batches():
        for start in range(0, len(files), batch_size):
            images = []
            for f in files[start : start + batch_size]:
                try:
                    images.append(torch.from_numpy(decode_image_bytes(None, str(f), "", snap.model_config.image_size)))
                    kept.append(f)
                except ValueError as exc:
                    failed.append(f"{f}: {exc}")
            if images:
                yield torch.stack(images)

    batches = progress(decoded_batches(), total=-(-len(files) // batch_size), desc="predict", unit="batch")
    logits, _ = predict_batches(model, batches, device=dev)
    if failed:
        log.warning("predict: %d unreadable file(s) skipped, e.g. %s", len(failed), "; ".join(failed[:3]))
    if not kept:
        raise UserError("--inputs: none of the images could be read")
    require_finite(logits, f"--checkpoint {snap.path}")
    none = [None] * len(kept)
    return prediction_table(map(str, kept), none, none, torch.sigmoid(logits).numpy(), threshold)


def predict_parquet(checkpoint: list[str], data_root: str, *, threshold: float | str = 0.5, **data_options) -> pa.Table:
    """Every readable row of a parquet dataset, labelled or not, whatever its split column says."""
    snap, rows, probs, sources, labels = predict_dataset(checkpoint, data_root, **data_options)
    paths, within = np.empty(len(rows), dtype=object), np.empty(len(rows), dtype=np.int64)
    for file, positions, file_row in file_rows(data_root, rows):
        paths[positions] = str(file)
        within[positions] = file_row
    sources = sources.tolist() if sources is not None else [None] * len(rows)
    has_labels = bool((labels >= 0).any())
    return prediction_table(
        paths, within, sources, probs, resolve_threshold(threshold, snap), labels if has_labels else None
    )


def write_predictions(table: pa.Table, output: str | None) -> None:
    """To `output` atomically, or to stdout; one CSV dialect for both."""
    if output:
        atomic_write(output, lambda f: pyarrow.csv.write_csv(table, f))
    else:
        sys.stdout.flush()  # log lines written so far come first
        pyarrow.csv.write_csv(table, sys.stdout.buffer)
        sys.stdout.buffer.flush()
