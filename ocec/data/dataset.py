"""Datasets: decoded images (decode.py) cut into splits, and what a training run reads.

A split is an index array into its dataset's decoded uint8 images [N, 3, H, W], which are shared by
all splits and memory-mapped from the cache: nothing is copied until a batch is taken, the test split
costs nothing while training, and mixing two datasets concatenates no images.
"""

from __future__ import annotations

import hashlib

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.config import TrainConfig
from ..core.errors import UserError
from .decode import cache_location, load_decoded
from .edits import RowEdits, apply_edits
from .parquet import SPLIT_ALIASES, SPLITS

log = logging.getLogger("ocec")


def _cut(count: int, ratios: tuple[float, float, float]) -> np.ndarray:
    """Boundaries that give each split round(ratio * count) rows, the remainder unused."""
    return np.floor(np.cumsum(ratios) * count + 0.5).astype(int)


def assign_splits(
    labels: np.ndarray, groups: np.ndarray | None, ratios: tuple[float, float, float], seed: int
) -> np.ndarray:
    """Seeded split -> index into SPLITS per row, -1 for rows left unused.

    Without groups: stratified by label. With groups (the `source` column, as codes): every group goes
    wholly to one side (no leakage), greedily to the split furthest below its share of rows.
    If that leaves a requested split empty (too few groups), fall back to the row-level split.
    """
    rng = np.random.default_rng(seed)
    if groups is not None:
        names, inverse = np.unique(groups, return_inverse=True)
        sizes = np.bincount(inverse, minlength=len(names))
        targets = np.array(list(ratios) + [max(0.0, 1.0 - sum(ratios))]) * len(labels)
        filled = np.zeros(4)
        bucket_of_group = np.empty(len(names), dtype=int)
        for g in rng.permutation(len(names)):
            bucket = int(np.argmax(targets - filled))
            bucket_of_group[g] = bucket
            filled[bucket] += sizes[g]
        out = np.array([0, 1, 2, -1], dtype=np.int8)[bucket_of_group[inverse]]
        if all((out == i).any() for i, ratio in enumerate(ratios) if ratio > 0):
            return out
        log.warning(
            "split: only %d distinct source values, too few to keep each source on one side; "
            "splitting rows instead (sources may appear on both sides)",
            len(names),
        )
    out = np.full(len(labels), -1, dtype=np.int8)
    for cls in np.unique(labels):  # 0, 1 (and -1 for unlabelled rows)
        idx = rng.permutation(np.flatnonzero(labels == cls))
        bounds = _cut(len(idx), ratios)
        for code, (start, stop) in enumerate(zip([0, *bounds[:2]], bounds)):
            out[idx[start:stop]] = code
    return out


@dataclass
class Split:
    """One split: row indices into its dataset's decoded images (shared, memory-mapped), with labels and sources."""

    name: str
    images: torch.Tensor  # uint8 [N, 3, H, W]: every image of the dataset
    rows: torch.Tensor  # int64 indices into `images`
    labels: torch.Tensor  # int64 per row of this split (-1: unlabelled)
    sources: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def class_counts(self) -> tuple[int, int]:
        ones = int((self.labels == 1).sum())
        return len(self) - ones, ones

    def take(self, positions) -> torch.Tensor:
        """The uint8 images at `positions` of this split (a slice or an index tensor), as a new tensor."""
        return self.images[self.rows[positions]]

    def batches(self, batch_size: int):
        """The split's images in order, `batch_size` at a time."""
        for start in range(0, len(self), batch_size):
            yield self.take(slice(start, start + batch_size))


def join_splits(name: str, parts: list[Split]) -> Split:
    """Several splits of one dataset as one (e.g. 'all' for eval)."""
    sources = None if parts[0].sources is None else np.concatenate([p.sources for p in parts])
    rows, labels = torch.cat([p.rows for p in parts]), torch.cat([p.labels for p in parts])
    return Split(name, parts[0].images, rows, labels, sources)


@dataclass
class Dataset:
    splits: dict[str, Split] = field(default_factory=dict)
    skipped_bad: int = 0
    skipped_split: int = 0

    def get(self, name: str) -> Split | None:
        split = self.splits.get(name)
        return split if split is not None and len(split) else None

    def all(self) -> Split:
        return join_splits("all", [s for s in self.splits.values() if len(s)])


def load_dataset(
    data_root: str | Path,
    image_size: tuple[int, int],
    *,
    ratios: tuple[float, float, float],
    seed: int,
    num_workers: int,
    cache_dir: Path | None,
    max_bad_fraction: float,
    flag: str = "--data_root",
    require_labels: bool = True,
    verify: bool = True,
    edits: RowEdits | None = None,
) -> Dataset:
    """Read, decode (or memory-map from the cache) and split a dataset: the 'split' column, else a seeded
    split by `ratios`. `flag` names the option the path came from, in log lines and errors."""
    name = flag.lstrip("-")
    decoded = load_decoded(
        data_root,
        image_size,
        num_workers=num_workers,
        cache_dir=cache_dir,
        flag=flag,
        require_labels=require_labels,
        verify=verify,
    )
    rows = decoded.rows
    if rows.split_codes is not None:
        log.info("%s: %d rows; using the 'split' column (--train/val/test_ratio ignored)", name, len(rows))
        codes = rows.split_codes
    else:
        codes = assign_splits(rows.labels, rows.source_codes, tuple(ratios), seed)
        kind = "source-grouped" if rows.source_codes is not None else "stratified"
        log.info("%s: %d rows; no 'split' column: seeded %s split %g/%g/%g", name, len(rows), kind, *ratios)
    unknown = int((codes < 0).sum()) if rows.split_codes is not None else 0
    if unknown:
        log.warning("%s: %d row(s) with a split other than train/val/test (or empty) skipped", name, unknown)
    if unknown == len(rows):
        raise UserError(
            f"{flag} {data_root}: no row has a split of train/val/test (aliases: {', '.join(sorted(SPLIT_ALIASES))})"
        )
    row_labels = rows.labels
    if edits is not None:  # --exclude / --relabel / --split_codes (ocec audit's folds)
        codes, row_labels = apply_edits(edits, str(data_root), codes, rows.labels, SPLITS)
    used = codes >= 0
    bad_used = [r for r in sorted(decoded.bad) if used[r]]
    if bad_used:
        examples = "; ".join(decoded.bad[r] for r in bad_used[:3])
        log.warning("%s: %d row(s) with unreadable images skipped, e.g. %s", name, len(bad_used), examples)
        fraction = len(bad_used) / max(1, int(used.sum()))
        if fraction > max_bad_fraction:
            raise UserError(
                f"{flag} {data_root}: {len(bad_used)} of {int(used.sum())} images unreadable "
                f"({fraction:.1%} > --max_bad_fraction {max_bad_fraction:g}); first: {decoded.bad[bad_used[0]]}"
            )
    ok = used.copy()
    ok[bad_used] = False
    images = torch.from_numpy(decoded.images)
    dataset = Dataset(skipped_bad=len(bad_used), skipped_split=unknown)
    for code, split_name in enumerate(SPLITS):
        idx = np.flatnonzero(ok & (codes == code))
        labels = torch.from_numpy(row_labels[idx])
        dataset.splits[split_name] = Split(split_name, images, torch.from_numpy(idx), labels, rows.sources(idx))
    labelled = bool((rows.labels >= 0).all())
    counts = ", ".join(
        f"{s} {len(dataset.splits[s])}" + (f" (open {dataset.splits[s].class_counts[1]})" if labelled else "")
        for s in SPLITS
    )
    counts += "" if labelled else " (unlabelled)"
    log.info("%s: %s", name, counts)
    return dataset


@dataclass
class TrainingData:
    """What a training run reads: its train and val splits, the extra train rows added to every epoch,
    the mixed-in pool an epoch takes a share from, the extra val split."""

    train: Split
    val: Split | None
    mix: Split | None = None
    extra_val: Split | None = None
    extra_train: Split | None = None

    def fingerprint(self) -> list:
        """Rows and open labels of each split: equal on every machine that reads the same data."""
        splits = (self.train, self.val, self.mix, self.extra_val, self.extra_train)
        return [None if s is None else (len(s), int(s.labels.sum())) for s in splits]


def load_training_data(cfg: TrainConfig, image_size: tuple[int, int], verify_cache: bool = True) -> TrainingData:
    """The splits a run trains and validates on (`verify_cache`: see load_decoded)."""
    common = dict(
        ratios=(cfg.train_ratio, cfg.val_ratio, cfg.test_ratio),
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        cache_dir=cache_location(cfg.cache_dir, cfg.no_cache),
        max_bad_fraction=cfg.max_bad_fraction,
        verify=verify_cache,
    )

    def split_of(root: str, flag: str, name: str) -> Split | None:
        return load_dataset(root, image_size, flag=flag, **common).get(name)

    data = load_dataset(cfg.data_root, image_size, edits=RowEdits.from_config(cfg), **common)
    train = data.get("train")
    if train is None:
        raise UserError(f"--data_root {cfg.data_root}: the train split is empty")
    if len(train.labels.unique()) < 2:
        only = ("closed", "open")[int(train.labels[0])]
        raise UserError(
            f"--data_root {cfg.data_root}: every train row is '{only}': a classifier needs both classes "
            "(is the parquet sorted by label and cut, or the split column wrong?)"
        )
    mix = split_of(cfg.mix_data_root, "--mix_data_root", "train") if cfg.mix_data_root else None
    if cfg.mix_data_root and mix is None:
        raise UserError(f"--mix_data_root {cfg.mix_data_root}: its train split is empty")
    extra = split_of(cfg.extra_val_root, "--extra_val_root", "val") if cfg.extra_val_root else None
    if cfg.extra_val_root and extra is None:
        raise UserError(f"--extra_val_root {cfg.extra_val_root}: its val split is empty")
    added = split_of(cfg.extra_train_root, "--extra_train_root", "train") if cfg.extra_train_root else None
    if cfg.extra_train_root and added is None:
        raise UserError(f"--extra_train_root {cfg.extra_train_root}: its train split is empty")
    if added is not None:
        refuse_overlap(added, [s for s in (data.get("val"), data.get("test")) if s is not None], cfg)
    return TrainingData(train, data.get("val"), mix, extra, added)


def image_hashes(split: Split) -> list[bytes]:
    """One digest of the decoded pixels per row: equal images are equal whether they came as bytes or paths."""
    return [hashlib.blake2b(split.images[int(r)].numpy().tobytes(), digest_size=16).digest() for r in split.rows]


def refuse_overlap(extra_train: Split, held_out: list[Split], cfg: TrainConfig) -> None:
    """Extra training rows must not be images of the val/test split: the best checkpoint would be chosen on
    images the model trained on (e.g. pseudo-labels made from the whole labelled dataset)."""
    judged = {h for split in held_out for h in image_hashes(split)}
    hits = [i for i, h in enumerate(image_hashes(extra_train)) if h in judged]
    if hits:
        raise UserError(
            f"--extra_train_root {cfg.extra_train_root}: {len(hits)} of its {len(extra_train)} train images are "
            f"also in the val/test split of --data_root {cfg.data_root} (first: its train row {hits[0]}); remove "
            "them, or pseudo-label data that holds no val/test images"
        )
