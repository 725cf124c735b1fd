"""Parquet -> validated rows -> splits -> decoded uint8 tensors, decoded once and cached.

Reading is column-wise with pyarrow; only the metadata columns are read when the decoded
cache is valid. Decoding (Pillow) runs once per dataset and image size, in worker
processes, and the result ([N, 3, H, W] uint8) is cached on disk keyed by the parquet files'
paths, sizes and mtimes and the image size. Training then never touches a file or a PIL image.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
import warnings
import zipfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from .config import TrainConfig
from .errors import UserError
from .fileio import atomic_write
from .reporting import progress

log = logging.getLogger("ocec")

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "trn": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "eval": "val",
    "test": "test",
    "testing": "test",
    "tst": "test",
}
LABEL_ALIASES = {"open": 1, "opened": 1, "closed": 0, "close": 0, "0": 0, "1": 1}
CACHE_VERSION = 1
DECODE_CHUNK = 256
IN_PROCESS_ROWS = 2048  # below this, starting worker processes costs more than it saves


# --- reading ---------------------------------------------------------------------------------


def find_parquet_files(data_root: str | Path, flag: str = "--data_root") -> list[Path]:
    """A .parquet file, or a folder: its dataset.parquet if present, else every *.parquet below it (sorted)."""
    root = Path(data_root).expanduser()
    if not root.exists():
        raise UserError(f"{flag} {root}: no such file or directory")
    if root.is_file():
        if root.suffix.lower() != ".parquet":
            raise UserError(f"{flag} {root}: not a .parquet file")
        return [root.resolve()]
    if (root / "dataset.parquet").is_file():
        return [(root / "dataset.parquet").resolve()]
    files = sorted(p.resolve() for p in root.rglob("*.parquet") if p.is_file())
    if not files:
        raise UserError(f"{flag} {root}: the folder holds no .parquet files")
    return files


@dataclass
class Table:
    """Metadata of every row in the dataset's parquet files (no pixels)."""

    files: list[Path]
    file_index: np.ndarray  # int32 per row: which file
    row_index: np.ndarray  # int64 per row: row within that file
    labels: np.ndarray  # int64, 0 closed / 1 open
    splits: np.ndarray | None  # normalised split name per row ('' = unknown/missing), None: no column
    sources: np.ndarray | None  # str per row, None: no column
    image_paths: np.ndarray  # str per row ('' if none)

    def __len__(self) -> int:
        return len(self.labels)

    def where(self, i: int) -> str:
        return f"{self.files[self.file_index[i]]} row {self.row_index[i]}"


def _dictionary(column: pa.ChunkedArray) -> tuple[list, np.ndarray]:
    """Unique values and per-row indices (-1 for null): per-unique-value Python, never per-row."""
    encoded = pc.dictionary_encode(column.combine_chunks())
    indices = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return encoded.dictionary.to_pylist(), indices


def _label_of(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str):
        return LABEL_ALIASES.get(value.strip().lower())
    return None


def _read_one(path: Path) -> dict:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable parquet file ({_first_line(exc)})") from None
    names = set(schema.names)
    if not names & {"label", "class_id"}:
        raise UserError(f"{path}: needs a 'label' or 'class_id' column (has: {', '.join(schema.names)})")
    if not names & {"image_bytes", "image_path"}:
        raise UserError(f"{path}: needs an 'image_bytes' or 'image_path' column (has: {', '.join(schema.names)})")
    wanted = [c for c in ("split", "label", "class_id", "image_path", "source") if c in names]
    try:
        table = pq.read_table(path, columns=wanted)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: cannot read columns {wanted} ({_first_line(exc)})") from None
    n = table.num_rows
    labels = np.full(n, -1, dtype=np.int64)
    for column in ("class_id", "label"):  # class_id wins where both are set
        if column not in names:
            continue
        values, idx = _dictionary(table.column(column))
        mapped = np.array([_label_of(v) if _label_of(v) is not None else -2 for v in values] + [-1], dtype=np.int64)
        per_row = mapped[idx]  # idx -1 -> the appended -1 (null)
        bad = np.flatnonzero((per_row == -2) & (labels < 0))
        if len(bad):
            value = values[idx[bad[0]]]
            raise UserError(f"{path} row {bad[0]}: {column} {value!r} is not one of open/closed/0/1")
        labels = np.where(labels < 0, per_row, labels)
    missing = np.flatnonzero(labels < 0)
    if len(missing):
        raise UserError(f"{path} row {missing[0]}: no label (both class_id and label are empty)")
    out = {"n": n, "labels": labels, "splits": None, "sources": None}
    if "split" in names:
        values, idx = _dictionary(table.column("split"))
        normal = np.array([SPLIT_ALIASES.get(str(v).strip().lower(), "") for v in values] + [""], dtype=object)
        out["splits"] = normal[idx]
    if "source" in names:
        values, idx = _dictionary(table.column("source"))
        out["sources"] = np.array([str(v) for v in values] + ["(none)"], dtype=object)[idx]
    if "image_path" in names:
        values, idx = _dictionary(table.column("image_path"))
        out["paths"] = np.array([str(v) for v in values] + [""], dtype=object)[idx]
    else:
        out["paths"] = np.full(n, "", dtype=object)
    return out


def read_table(data_root: str | Path, flag: str = "--data_root") -> Table:
    files = find_parquet_files(data_root, flag)
    parts = [_read_one(f) for f in files]
    total = sum(p["n"] for p in parts)
    if total == 0:
        raise UserError(f"{flag} {data_root}: the parquet data has no rows")
    has_split = any(p["splits"] is not None for p in parts)
    has_source = any(p["sources"] is not None for p in parts)

    def gather(key, fill):
        return np.concatenate([p[key] if p[key] is not None else np.full(p["n"], fill, dtype=object) for p in parts])

    return Table(
        files=files,
        file_index=np.concatenate([np.full(p["n"], i, dtype=np.int32) for i, p in enumerate(parts)]),
        row_index=np.concatenate([np.arange(p["n"], dtype=np.int64) for p in parts]),
        labels=np.concatenate([p["labels"] for p in parts]),
        splits=gather("splits", "") if has_split else None,
        sources=gather("sources", "(none)") if has_source else None,
        image_paths=gather("paths", ""),
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- splitting --------------------------------------------------------------------------------


def _cut(count: int, ratios: tuple[float, float, float]) -> np.ndarray:
    """Boundaries that give each split round(ratio * count) rows, the remainder unused."""
    return np.floor(np.cumsum(ratios) * count + 0.5).astype(int)


def assign_splits(
    labels: np.ndarray, groups: np.ndarray | None, ratios: tuple[float, float, float], seed: int
) -> np.ndarray:
    """Seeded split -> 'train'/'val'/'test'/'' (unused) per row.

    Without groups: stratified by label. With groups (the `source` column): every group goes
    wholly to one side (no leakage), greedily to the split furthest below its share of rows.
    If that leaves a requested split empty (too few groups), fall back to the row-level split.
    """
    rng = np.random.default_rng(seed)
    out = np.full(len(labels), "", dtype=object)
    if groups is not None:
        names, inverse = np.unique(groups.astype(str), return_inverse=True)
        sizes = np.bincount(inverse, minlength=len(names))
        targets = np.array(list(ratios) + [max(0.0, 1.0 - sum(ratios))]) * len(labels)
        filled = np.zeros(4)
        bucket_of_group = np.empty(len(names), dtype=int)
        for g in rng.permutation(len(names)):
            bucket = int(np.argmax(targets - filled))
            bucket_of_group[g] = bucket
            filled[bucket] += sizes[g]
        buckets = np.array(list(SPLITS) + [""], dtype=object)
        out = buckets[bucket_of_group[inverse]]
        if all((out == name).any() for name, ratio in zip(SPLITS, ratios) if ratio > 0):
            return out
        log.warning(
            "split: only %d distinct source values, too few to keep each source on one side; "
            "splitting rows instead (sources may appear on both sides)",
            len(names),
        )
        out = np.full(len(labels), "", dtype=object)
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        bounds = _cut(len(idx), ratios)
        for name, start, stop in zip(SPLITS, [0, *bounds[:2]], bounds):
            out[idx[start:stop]] = name
    return out


# --- decoding ---------------------------------------------------------------------------------


def decode_image_bytes(data, path: str, base_dir: str, size: tuple[int, int]) -> np.ndarray:
    """Bytes (or the file at `path`, relative to `base_dir`) -> RGB uint8 [3, H, W] resized to `size`.

    Pillow, not torchvision.io: torchvision's libpng path crashes the process (SIGSEGV) on some
    corrupted PNGs, while Pillow raises. Pillow's bilinear resize is also what the upstream trainer
    used (torchvision Resize on PIL images), so imported models see the same pixels.
    """
    if data is None:
        if not path:
            raise ValueError("no image_bytes and no image_path")
        file = Path(path) if os.path.isabs(path) else Path(base_dir) / path
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read {file}: {exc.strerror or exc}") from None
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"image_bytes is {type(data).__name__}, not bytes")
    if len(data) == 0:
        raise ValueError("empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.mode.startswith("I;16"):  # 16-bit grey: keep the high byte
                    image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
                image = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
                pixels = np.asarray(image)
    except (
        OSError,
        SyntaxError,
        ValueError,
        TypeError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        raise ValueError(f"undecodable image ({_first_line(exc)})") from None
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _decode_chunk(task: tuple) -> tuple[int, np.ndarray, list[tuple[int, str]]]:
    offset, datas, paths, base_dir, size = task
    out = np.zeros((len(paths), 3, *size), dtype=np.uint8)
    bad = []
    for i, (data, path) in enumerate(zip(datas, paths)):
        try:
            out[i] = decode_image_bytes(data, path, base_dir, size)
        except ValueError as exc:
            bad.append((offset + i, str(exc)))
    return offset, out, bad


def _worker_init() -> None:
    torch.set_num_threads(1)


def _chunks(table: Table, size: tuple[int, int]):
    offset = 0
    for path in table.files:
        try:
            parquet = pq.ParquetFile(path)
            columns = [c for c in ("image_bytes", "image_path") if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=DECODE_CHUNK, columns=columns):
                n = batch.num_rows
                datas = batch.column("image_bytes").to_pylist() if "image_bytes" in columns else [None] * n
                paths = table.image_paths[offset : offset + n].tolist()
                yield offset, datas, paths, str(path.parent), size
                offset += n
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"{path}: cannot read the image column ({_first_line(exc)})") from None


def decode_all(table: Table, size: tuple[int, int], num_workers: int) -> tuple[np.ndarray, dict[int, str]]:
    """Decode every row once -> (uint8 [N, 3, H, W], {row: reason} for rows that could not be read)."""
    images = np.zeros((len(table), 3, *size), dtype=np.uint8)
    bad: dict[int, str] = {}
    bar = progress(total=len(table), desc="decode", unit="img")

    def collect(result):
        offset, block, failures = result
        images[offset : offset + len(block)] = block
        bad.update(failures)
        bar.update(len(block))

    if num_workers <= 1 or len(table) < IN_PROCESS_ROWS:
        for task in _chunks(table, size):
            collect(_decode_chunk(task))
    else:
        context = multiprocessing.get_context("spawn")  # fork after torch has threads can deadlock
        with ProcessPoolExecutor(num_workers, mp_context=context, initializer=_worker_init) as pool:
            pending: deque = deque()
            for task in _chunks(table, size):
                pending.append(pool.submit(_decode_chunk, task))
                if len(pending) >= 4 * num_workers:  # bounded: never all image bytes in flight at once
                    collect(pending.popleft().result())
            while pending:
                collect(pending.popleft().result())
    bar.close()
    return images, bad


# --- cache --------------------------------------------------------------------------------------


def cache_location(cache_dir: str | None, no_cache: bool = False) -> Path | None:
    """Where decoded images are cached: --cache_dir, else $OCEC_CACHE_DIR, else ~/.cache/ocec; None: nowhere."""
    if no_cache:
        return None
    return Path(cache_dir or os.environ.get("OCEC_CACHE_DIR") or Path.home() / ".cache" / "ocec").expanduser()


def cache_key(files: list[Path], size: tuple[int, int]) -> str:
    digest = hashlib.sha256(f"ocec-decoded-v{CACHE_VERSION}|{size[0]}x{size[1]}".encode())
    for f in files:
        st = f.stat()
        digest.update(f"|{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def _load_cache(path: Path, rows: int, size: tuple[int, int]):
    """The cached arrays, or None when missing, stale or damaged (zip CRCs catch corrupted bytes)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, bad_rows, reasons = npz["images"], npz["bad_rows"], npz["bad_reasons"]
        if images.shape != (rows, 3, *size) or images.dtype != np.uint8:
            raise ValueError(f"shape {images.shape}")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("decode cache %s is damaged (%s); rebuilding it", path, _first_line(exc))
        path.unlink(missing_ok=True)
        return None
    return images, dict(zip(bad_rows.tolist(), reasons.tolist()))


def _save_cache(path: Path, images: np.ndarray, bad: dict[int, str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = np.array(sorted(bad), dtype=np.int64)
        reasons = np.array([bad[r] for r in rows.tolist()], dtype=str) if len(rows) else np.array([], dtype="<U1")
        atomic_write(path, lambda f: np.savez(f, images=images, bad_rows=rows, bad_reasons=reasons))
    except (UserError, OSError) as exc:  # a cache we cannot write only costs time next run
        log.warning("could not write decode cache %s (%s); continuing without it", path, exc)


def decoded_images(table: Table, size: tuple[int, int], num_workers: int, cache_dir: Path | None):
    """Decode with the on-disk cache (None: no cache): a second run on unchanged files skips decoding."""
    if cache_dir is None:
        return decode_all(table, size, num_workers)
    path = cache_dir / f"decoded-{cache_key(table.files, size)}.npz"
    cached = _load_cache(path, len(table), size)
    if cached is not None:
        log.info("decode cache hit: %s", path)
        return cached
    images, bad = decode_all(table, size, num_workers)
    _save_cache(path, images, bad)
    return images, bad


# --- the dataset a run trains on ------------------------------------------------------------------


@dataclass
class Split:
    """One split, decoded: uint8 images [N, 3, H, W], int64 labels, per-row source."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    sources: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def class_counts(self) -> tuple[int, int]:
        ones = int(self.labels.sum())
        return len(self) - ones, ones


@dataclass
class Dataset:
    splits: dict[str, Split] = field(default_factory=dict)
    skipped_bad: int = 0
    skipped_split: int = 0

    def get(self, name: str) -> Split | None:
        split = self.splits.get(name)
        return split if split is not None and len(split) else None


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
) -> Dataset:
    """Read, split (the 'split' column, else seeded `ratios`) and decode a dataset. `flag` names the
    option the path came from, in log lines and errors."""
    name = flag.lstrip("-")
    table = read_table(data_root, flag)
    if table.splits is not None:
        log.info(
            "%s: %d rows in %d file(s); using the 'split' column (--train/val/test_ratio ignored)",
            name,
            len(table),
            len(table.files),
        )
        splits = table.splits
    else:
        splits = assign_splits(table.labels, table.sources, tuple(ratios), seed)
        log.info(
            "%s: %d rows in %d file(s); no 'split' column: seeded %s split %g/%g/%g",
            name,
            len(table),
            len(table.files),
            "source-grouped" if table.sources is not None else "stratified",
            *ratios,
        )
    unknown = int((splits == "").sum()) if table.splits is not None else 0
    if unknown:
        log.warning("%s: %d row(s) with a split other than train/val/test (or empty) skipped", name, unknown)
    if unknown == len(table):
        raise UserError(
            f"{flag} {data_root}: no row has a split of train/val/test (aliases: {', '.join(sorted(SPLIT_ALIASES))})"
        )

    images, bad = decoded_images(table, image_size, num_workers, cache_dir)
    used = splits != ""
    bad_used = [r for r in sorted(bad) if used[r]]
    if bad_used:
        log.warning(
            "%s: %d row(s) with unreadable images skipped, e.g. %s",
            name,
            len(bad_used),
            "; ".join(f"{table.where(r)}: {bad[r]}" for r in bad_used[:3]),
        )
        fraction = len(bad_used) / max(1, int(used.sum()))
        if fraction > max_bad_fraction:
            raise UserError(
                f"{flag} {data_root}: {len(bad_used)} of {int(used.sum())} images unreadable "
                f"({fraction:.1%} > --max_bad_fraction {max_bad_fraction:g}); first: "
                f"{table.where(bad_used[0])}: {bad[bad_used[0]]}"
            )
    ok = used.copy()
    ok[bad_used] = False
    dataset = Dataset(skipped_bad=len(bad_used), skipped_split=unknown)
    for split_name in SPLITS:
        idx = np.flatnonzero(ok & (splits == split_name))
        dataset.splits[split_name] = Split(
            split_name,
            torch.from_numpy(images[idx]),
            torch.from_numpy(table.labels[idx]),
            None if table.sources is None else table.sources[idx],
        )
    log.info(
        "%s: " + ", ".join(f"{s} {len(dataset.splits[s])} (open {dataset.splits[s].class_counts[1]})" for s in SPLITS),
        name,
    )
    return dataset


@dataclass
class TrainingData:
    """What a training run reads: its train and val splits, the mixed-in pool, the extra val split."""

    train: Split
    val: Split | None
    mix: Split | None = None
    extra_val: Split | None = None


def load_training_data(cfg: TrainConfig, image_size: tuple[int, int]) -> TrainingData:
    common = dict(
        ratios=(cfg.train_ratio, cfg.val_ratio, cfg.test_ratio),
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        cache_dir=cache_location(cfg.cache_dir, cfg.no_cache),
        max_bad_fraction=cfg.max_bad_fraction,
    )

    def split_of(root: str, flag: str, name: str) -> Split | None:
        return load_dataset(root, image_size, flag=flag, **common).get(name)

    data = load_dataset(cfg.data_root, image_size, **common)
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
    return TrainingData(train, data.get("val"), mix, extra)
