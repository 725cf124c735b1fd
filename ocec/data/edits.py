"""Acting on a label audit: drop listed rows (`--exclude`, `--exclude_top N`), flip listed labels
(`--relabel`), or assign every row's split from a file (`--split_codes`, how `ocec audit` trains its folds).
Rows are named by their `image_path`; a listed path that is not in the data is counted, not an error.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..core.errors import UserError
from .parquet import find_parquet_files

log = logging.getLogger("ocec")


def read_path_list(path: str, flag: str, top: int | None = None) -> list[str]:
    """The image paths a file lists: a CSV with an `image_path` column (ordered by its `rank` column when it
    has one, as `ocec audit`'s label_issues.csv), or a text file with one path per line. `top`: the first N."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{flag} {path}: no such file")
    text = file.read_text(errors="replace")
    first = text.splitlines()[0] if text.strip() else ""
    if "image_path" in [c.strip() for c in first.split(",")]:
        rows = list(csv.DictReader(text.splitlines()))
        if rows and "rank" in rows[0]:
            try:
                rows.sort(key=lambda r: float(r["rank"]))
            except ValueError:
                raise UserError(f"{flag} {path}: the rank column holds a value that is not a number") from None
        paths = [r["image_path"].strip() for r in rows if r.get("image_path", "").strip()]
    else:
        paths = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return paths[:top] if top is not None else paths


def image_paths_of(data_root: str, flag: str = "--data_root") -> np.ndarray:
    """Each row's image_path, in the decoded rows' order (one column read per file)."""
    paths = []
    for file in find_parquet_files(data_root, flag):
        if "image_path" not in pq.read_schema(file).names:
            raise UserError(
                f"{flag} {data_root}: {file} has no image_path column; --exclude and --relabel name rows by it"
            )
        paths.append(np.asarray(pq.read_table(file, columns=["image_path"]).column(0).to_pylist(), dtype=object))
    return np.concatenate(paths)


@dataclass
class RowEdits:
    exclude: list[str] = field(default_factory=list)
    relabel: list[str] = field(default_factory=list)
    split_codes: str | None = None  # a .npy of int8 split codes per row (-1 skip, 0 train, 1 val, 2 test)

    @classmethod
    def from_config(cls, cfg) -> RowEdits | None:
        if not (cfg.exclude or cfg.relabel or cfg.split_codes):
            return None
        exclude = read_path_list(cfg.exclude, "--exclude", cfg.exclude_top) if cfg.exclude else []
        relabel = read_path_list(cfg.relabel, "--relabel") if cfg.relabel else []
        return cls(exclude, relabel, cfg.split_codes)


def apply_edits(
    edits: RowEdits, data_root: str, codes: np.ndarray, labels: np.ndarray, split_names: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """-> (split codes, labels) after the edits, each logged: how many rows were dropped or flipped in which
    split, and how many listed paths matched nothing."""
    codes, labels = codes.copy(), labels.copy()
    if edits.split_codes:
        try:
            given = np.load(edits.split_codes)
        except (OSError, ValueError) as exc:
            raise UserError(f"--split_codes {edits.split_codes}: not a readable .npy file ({exc})") from None
        if given.shape != codes.shape:
            raise UserError(f"--split_codes {edits.split_codes}: {len(given)} codes for {len(codes)} rows")
        codes = given.astype(np.int8)
    if not (edits.exclude or edits.relabel):
        return codes, labels
    paths = image_paths_of(data_root)
    for flag, listed in (("--exclude", edits.exclude), ("--relabel", edits.relabel)):
        if not listed:
            continue
        hit = np.isin(paths, np.asarray(listed, dtype=object))
        hit &= labels >= 0
        counts = ", ".join(f"{name} {int((hit & (codes == i)).sum())}" for i, name in enumerate(split_names))
        missing = len(set(listed) - set(paths[hit].tolist()))
        if flag == "--exclude":
            codes[hit] = -1
            log.info("--exclude: %d row(s) dropped (%s); %d listed path(s) not in the data", hit.sum(), counts, missing)
        else:
            labels[hit] = 1 - labels[hit]
            log.info(
                "--relabel: %d label(s) flipped (%s); %d listed path(s) not in the data", hit.sum(), counts, missing
            )
    return codes, labels
