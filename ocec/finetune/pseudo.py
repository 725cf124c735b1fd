"""Predictions for a parquet dataset, labelled or not, and pseudo-labels from them: `ocec pseudo-label`.

Pseudo-labelling turns a model's confident predictions on the unlabelled part of dataset B into
training rows: a parquet with the ocec schema (split 'train', the predicted label, `source` marked
`pseudo:<source>`, a `confidence` column), which `ocec train --mix_data_root` mixes into the
labelled rows. A second round can start from the first round's model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..core.errors import UserError
from ..core.fileio import TMP_PREFIX
from ..data.dataset import load_dataset
from ..data.parquet import SPLITS, find_parquet_files, read_rows
from ..engine.inference import predict_split, require_finite
from ..engine.runtime import resolve_device
from .pretrained import Snapshot, load_for_inference, resolve_threshold

log = logging.getLogger("ocec")

# --threshold auto: measured by bench/transfer.py (1,000 labelled rows of B, 3,800 unlabelled): confidence
# >= 0.9 kept 3,500 rows, 96% right, and gained +0.024 F1; the most confident half (1,900 rows, 99% right)
# gained +0.018, three quarters +0.010, every row (94% right) +0.020.
AUTO_CONFIDENCE = 0.9


class Predictions(NamedTuple):
    snap: Snapshot
    rows: np.ndarray  # dataset row numbers (over all parquet files, in order)
    probs: np.ndarray  # prob_open per row
    sources: np.ndarray | None  # source per row, when the data has a source column
    labels: np.ndarray  # 0 closed, 1 open, -1 unlabelled


def predict_dataset(
    checkpoint: list[str],
    data_root: str,
    *,
    batch_size: int,
    device: str,
    num_workers: int,
    cache_dir,
    max_bad_fraction: float,
) -> Predictions:
    """prob_open for every readable row of `data_root`, labelled or not, whatever its split column says."""
    dev = resolve_device(device)
    model, snap, why = load_for_inference(checkpoint, dev)
    log.info("checkpoint: %s", why)
    data = load_dataset(
        data_root,
        snap.model_config.image_size,
        ratios=(1.0, 0.0, 0.0),
        seed=0,
        num_workers=num_workers,
        cache_dir=cache_dir,
        max_bad_fraction=max_bad_fraction,
        require_labels=False,
    )
    every = data.all()
    logits, _ = predict_split(model, every, batch_size=batch_size, device=dev, desc="predict")
    require_finite(logits, f"--checkpoint {snap.path}")
    return Predictions(snap, every.rows.numpy(), torch.sigmoid(logits).numpy(), every.sources, every.labels.numpy())


def file_rows(data_root: str, rows: np.ndarray) -> list[tuple[Path, np.ndarray, np.ndarray]]:
    """Dataset row numbers -> per parquet file: (file, positions in `rows`, row numbers within the file)."""
    files = find_parquet_files(data_root)
    starts = np.cumsum([0] + [pq.read_metadata(f).num_rows for f in files])
    out = []
    for i, f in enumerate(files):
        inside = np.flatnonzero((rows >= starts[i]) & (rows < starts[i + 1]))
        if len(inside):
            out.append((f, inside, rows[inside] - starts[i]))
    return out


def held_out_rows(data_root: str, rows: np.ndarray) -> np.ndarray:
    """Which of `rows` the data's own split column puts in val or test: those are never written as training
    rows (a model trained on them would pick its best checkpoint on images it learned)."""
    codes = read_rows(data_root, require_labels=False).split_codes
    if codes is None:
        return np.zeros(len(rows), dtype=bool)
    return np.isin(codes[rows], [SPLITS.index("val"), SPLITS.index("test")])


def choose_confident(probs: np.ndarray, min_confidence, balance: bool, threshold: float = 0.5) -> np.ndarray:
    """Positions of the rows to keep: those labelled (open if prob >= `threshold`) with a probability of their
    class of at least `min_confidence` (AUTO_CONFIDENCE for 'auto'), most confident first; `balance` keeps
    as many of each class."""
    level = AUTO_CONFIDENCE if min_confidence == "auto" else float(min_confidence)
    is_open = probs >= threshold
    confidence = np.where(is_open, probs, 1 - probs)
    keep = []
    for cls in (False, True):
        members = np.flatnonzero(is_open == cls)
        members = members[confidence[members] >= level]
        keep.append(members[np.argsort(-confidence[members], kind="stable")])
    if balance:
        count = min(len(k) for k in keep)
        keep = [k[:count] for k in keep]
    return np.sort(np.concatenate(keep))


def pseudo_label(
    checkpoint: list[str],
    data_root: str,
    out: str,
    *,
    min_confidence="auto",
    threshold="auto",
    balance: bool = False,
    batch_size: int,
    device: str,
    num_workers: int,
    cache_dir,
    max_bad_fraction: float,
) -> dict:
    snap, rows, probs, sources, _ = predict_dataset(
        checkpoint,
        data_root,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        cache_dir=cache_dir,
        max_bad_fraction=max_bad_fraction,
    )
    held_out = held_out_rows(data_root, rows)
    candidates = np.flatnonzero(~held_out)
    if not len(candidates):
        raise UserError(
            f"--data_root {data_root}: every row is in its val or test split; nothing to label for training"
        )
    decision = 0.5 if threshold == "auto" and snap.threshold is None else resolve_threshold(threshold, snap)
    keep = candidates[choose_confident(probs[candidates], min_confidence, balance, decision)]
    if not len(keep):
        raise UserError(f"--min_confidence {min_confidence}: no prediction is that confident; lower it")
    labels = (probs[keep] >= decision).astype(np.int64)
    confidence = np.where(labels == 1, probs[keep], 1 - probs[keep])
    folder = Path(out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    tmp, path = folder / f"{TMP_PREFIX}dataset.parquet", folder / "dataset.parquet"
    order = np.argsort(rows[keep], kind="stable")  # write in the source's row order
    keep, labels, confidence = keep[order], labels[order], confidence[order]
    writer = None
    try:
        for file, positions, file_rows_ in file_rows(data_root, rows[keep]):
            names = pq.read_schema(file).names
            wanted = [c for c in ("image_bytes", "image_path") if c in names]
            table = pq.read_table(file, columns=wanted).take(pa.array(file_rows_))
            if "image_path" in wanted:  # keep relative paths working from the new folder
                paths = [
                    p if p is None or Path(p).is_absolute() else str(file.parent / p)
                    for p in table.column("image_path").to_pylist()
                ]
                table = table.set_column(
                    table.schema.get_field_index("image_path"), "image_path", pa.array(paths, pa.string())
                )
            k = keep[positions]
            origin = sources[k] if sources is not None else np.full(len(k), "(none)", dtype=object)
            columns = {
                "split": pa.array(["train"] * len(k)),
                "label": pa.array(["open" if v else "closed" for v in labels[positions]]),
                "class_id": pa.array(labels[positions], pa.int64()),
                **{c: table.column(c) for c in wanted},
                "source": pa.array([f"pseudo:{s}" for s in origin]),
                "confidence": pa.array(confidence[positions], pa.float32()),
            }
            batch = pa.table(columns)
            writer = writer or pq.ParquetWriter(tmp, batch.schema)
            writer.write_table(batch)
        writer.close()
        tmp.replace(path)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    opened = int(labels.sum())
    return {
        "output": str(path),
        "rows": int(len(rows)),
        "held_out": int(held_out.sum()),
        "threshold": float(decision),
        "kept": int(len(keep)),
        "open": opened,
        "closed": int(len(keep)) - opened,
        "min_confidence": float(confidence.min()),
        "mean_confidence": float(confidence.mean()),
    }
