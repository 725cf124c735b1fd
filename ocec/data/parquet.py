"""Parquet -> validated per-row metadata (labels, splits, sources, where each image is), column-wise.

Only the metadata columns are read here (never the image bytes), and every per-value conversion runs
once per distinct value (dictionary encoding), never once per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core.errors import UserError

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
NO_SOURCE = "(none)"
UNLABELLED = -1


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
    files = sorted(p.resolve() for p in root.rglob("*.parquet") if p.is_file() and not p.name.startswith(".tmp-"))
    if not files:
        raise UserError(f"{flag} {root}: the folder holds no .parquet files")
    return files


@dataclass
class Rows:
    """Per-row metadata of a dataset (no pixels)."""

    labels: np.ndarray  # int64: 0 closed, 1 open, -1 unlabelled (data without label columns)
    split_codes: np.ndarray | None  # int8 index into SPLITS, -1 for other or missing; None: no split column
    source_codes: np.ndarray | None  # int32 index into source_names; None: no source column
    source_names: list[str] = field(default_factory=list)
    # Where each row lives: only when read from the parquet files (decoding needs them), not from the cache.
    files: list[Path] = field(default_factory=list)
    file_index: np.ndarray | None = None  # int32 per row
    row_index: np.ndarray | None = None  # int64 per row, within its file
    image_paths: np.ndarray | None = None  # str per row ('' if none)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())

    def sources(self, rows: np.ndarray) -> np.ndarray | None:
        """Source names of the given rows, or None without a source column."""
        if self.source_codes is None:
            return None
        return np.asarray(self.source_names, dtype=object)[self.source_codes[rows]]

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


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _labels(path: Path, table: pa.Table, names: set) -> np.ndarray:
    labels = np.full(table.num_rows, UNLABELLED, dtype=np.int64)
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
    if names & {"label", "class_id"} and len(missing):
        raise UserError(f"{path} row {missing[0]}: no label (both class_id and label are empty)")
    return labels


def _read_one(path: Path, require_labels: bool) -> dict:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable parquet file ({first_line(exc)})") from None
    names = set(schema.names)
    if require_labels and not names & {"label", "class_id"}:
        raise UserError(
            f"{path}: needs a 'label' or 'class_id' column to train or evaluate on (has: {', '.join(schema.names)}); "
            "unlabelled data can go to predict or pseudo-label"
        )
    if not names & {"image_bytes", "image_path"}:
        raise UserError(f"{path}: needs an 'image_bytes' or 'image_path' column (has: {', '.join(schema.names)})")
    wanted = [c for c in ("split", "label", "class_id", "image_path", "source") if c in names]
    try:
        table = pq.read_table(path, columns=wanted)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: cannot read columns {wanted} ({first_line(exc)})") from None
    n = table.num_rows
    out = {"n": n, "labels": _labels(path, table, names), "splits": None, "sources": None}
    if "split" in names:
        values, idx = _dictionary(table.column("split"))
        codes = [
            SPLITS.index(SPLIT_ALIASES[k]) if (k := str(v).strip().lower()) in SPLIT_ALIASES else -1 for v in values
        ]
        out["splits"] = np.array(codes + [-1], dtype=np.int8)[idx]
    if "source" in names:
        values, idx = _dictionary(table.column("source"))
        out["sources"] = ([str(v) for v in values] + [NO_SOURCE], idx)
    if "image_path" in names:
        values, idx = _dictionary(table.column("image_path"))
        out["paths"] = np.array([str(v) for v in values] + [""], dtype=object)[idx]
    else:
        out["paths"] = np.full(n, "", dtype=object)
    return out


def read_rows(data_root: str | Path, flag: str = "--data_root", require_labels: bool = True) -> Rows:
    files = find_parquet_files(data_root, flag)
    parts = [_read_one(f, require_labels) for f in files]
    if sum(p["n"] for p in parts) == 0:
        raise UserError(f"{flag} {data_root}: the parquet data has no rows")
    split_codes = source_codes = None
    if any(p["splits"] is not None for p in parts):
        split_codes = np.concatenate(
            [p["splits"] if p["splits"] is not None else np.full(p["n"], -1, np.int8) for p in parts]
        )
    names: list[str] = []
    if any(p["sources"] is not None for p in parts):
        # Source codes follow the sorted names, so grouping by code is grouping by name.
        names = sorted({NO_SOURCE, *(v for p in parts if p["sources"] for v in p["sources"][0])})
        code_of = {name: i for i, name in enumerate(names)}
        per_file = []
        for p in parts:
            if p["sources"] is None:
                per_file.append(np.full(p["n"], code_of[NO_SOURCE], dtype=np.int32))
            else:
                values, idx = p["sources"]
                per_file.append(np.array([code_of[v] for v in values], dtype=np.int32)[idx])
        source_codes = np.concatenate(per_file)
    return Rows(
        labels=np.concatenate([p["labels"] for p in parts]),
        split_codes=split_codes,
        source_codes=source_codes,
        source_names=names,
        files=files,
        file_index=np.concatenate([np.full(p["n"], i, dtype=np.int32) for i, p in enumerate(parts)]),
        row_index=np.concatenate([np.arange(p["n"], dtype=np.int64) for p in parts]),
        image_paths=np.concatenate([p["paths"] for p in parts]),
    )
