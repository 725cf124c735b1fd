"""Decoding every image once, and the on-disk cache that lets later runs skip it and memory-map it.

No torch here: the worker processes that decode import this module and should start small.
A cache entry is a folder `decoded-<key>/` in the cache directory:
  images.npy   uint8 [N, 3, H, W], decoded and resized once; later runs memory-map it (no copy in RAM)
  rows.npz     labels, split codes and source codes of every row: a cache hit reads no parquet column
  meta.json    shape, CRC-32 of the image data, source names, unreadable rows and why
It is written under a temporary name and renamed when complete, and its CRC-32 is verified on every
load (zlib, about 3.5 GB/s here: 0.7 s for 400k crops of 32x64); a damaged entry is deleted and rebuilt.
The key hashes the parquet files' paths, sizes, modification times and footers (which hold the row
groups' offsets, sizes and statistics) with the decode settings, so a hit costs a stat and a footer read
per file. Image files referenced by `image_path` are not part of the key (stat-ing 400k files per run).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import shutil
import warnings
import zlib
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..core.errors import UserError
from ..core.fileio import TMP_PREFIX
from ..core.progress import progress
from .parquet import Rows, find_parquet_files, first_line, read_rows

log = logging.getLogger("ocec")

CACHE_VERSION = 2
DECODE_CHUNK = 256
IN_PROCESS_ROWS = 2048  # below this, starting worker processes costs more than it saves
CRC_BLOCK = 1 << 26


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
        raise ValueError(f"undecodable image ({first_line(exc)})") from None
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


def _chunks(rows: Rows, size: tuple[int, int]):
    offset = 0
    for path in rows.files:
        try:
            parquet = pq.ParquetFile(path)
            columns = [c for c in ("image_bytes", "image_path") if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=DECODE_CHUNK, columns=columns):
                n = batch.num_rows
                datas = batch.column("image_bytes").to_pylist() if "image_bytes" in columns else [None] * n
                paths = rows.image_paths[offset : offset + n].tolist()
                yield offset, datas, paths, str(path.parent), size
                offset += n
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"{path}: cannot read the image column ({first_line(exc)})") from None


def decode_blocks(rows: Rows, size: tuple[int, int], num_workers: int):
    """Decoded blocks in row order: (offset, uint8 [n, 3, H, W], [(row, why it failed)])."""
    bar = progress(total=len(rows), desc="decode", unit="img")
    try:
        if num_workers <= 1 or len(rows) < IN_PROCESS_ROWS:
            for task in _chunks(rows, size):
                block = _decode_chunk(task)
                bar.update(len(block[1]))
                yield block
            return
        context = multiprocessing.get_context("spawn")  # fork after torch has threads can deadlock
        with ProcessPoolExecutor(num_workers, mp_context=context) as pool:
            pending: deque = deque()
            for task in _chunks(rows, size):
                pending.append(pool.submit(_decode_chunk, task))
                if len(pending) >= 4 * num_workers:  # bounded: never all image bytes in flight at once
                    block = pending.popleft().result()
                    bar.update(len(block[1]))
                    yield block
            while pending:
                block = pending.popleft().result()
                bar.update(len(block[1]))
                yield block
    finally:
        bar.close()


def cache_location(cache_dir: str | None, no_cache: bool = False) -> Path | None:
    """Where decoded images are cached: --cache_dir, else $OCEC_CACHE_DIR, else ~/.cache/ocec; None: nowhere."""
    if no_cache:
        return None
    return Path(cache_dir or os.environ.get("OCEC_CACHE_DIR") or Path.home() / ".cache" / "ocec").expanduser()


@dataclass
class Decoded:
    """A dataset's decoded images (memory-mapped from the cache, or in RAM) and its row metadata."""

    images: np.ndarray  # uint8 [N, 3, H, W]
    rows: Rows
    bad: dict[int, str]  # row -> why its image could not be read ("<file> row <r>: <reason>")


def cache_key(files: list[Path], size: tuple[int, int]) -> str:
    """Identifies the input cheaply and safely: paths, sizes, mtimes and parquet footers, and the decode settings."""
    digest = hashlib.sha256(f"ocec-decoded-v{CACHE_VERSION}|{size[0]}x{size[1]}".encode())
    for f in files:
        st = f.stat()
        digest.update(f"|{f}|{st.st_size}|{st.st_mtime_ns}|".encode())
        with f.open("rb") as handle:
            if st.st_size >= 12:  # a parquet file ends with <footer><4-byte footer length>PAR1
                handle.seek(-8, os.SEEK_END)
                length = int.from_bytes(handle.read(4), "little")
                handle.seek(-8 - min(length, st.st_size - 8), os.SEEK_END)
                digest.update(handle.read(min(length, st.st_size - 8)))
    return digest.hexdigest()[:24]


def crc32(images: np.ndarray, value: int = 0) -> int:
    flat = images.reshape(-1)
    for start in range(0, len(flat), CRC_BLOCK):
        value = zlib.crc32(memoryview(flat[start : start + CRC_BLOCK]), value)
    return value


def crc32_of_file(path: Path, offset: int) -> int:
    """CRC-32 of a file's bytes from `offset`, read through one reusable buffer: the pages pass through
    the page cache, not this process's resident memory (a memory-mapped read would add them all)."""
    value, buffer = 0, bytearray(CRC_BLOCK)
    with path.open("rb", buffering=0) as handle:
        handle.seek(offset)
        while count := handle.readinto(buffer):
            value = zlib.crc32(memoryview(buffer)[:count], value)
    return value


def load_decoded(
    data_root: str | Path,
    size: tuple[int, int],
    *,
    num_workers: int,
    cache_dir: Path | None,
    flag: str = "--data_root",
    require_labels: bool = True,
    verify: bool = True,
) -> Decoded:
    """The decoded dataset: a cache hit memory-maps it without reading any parquet column (and checks its
    CRC-32 unless `verify` is False: another process on this machine checked it); a miss reads and decodes
    (in `num_workers` processes) straight into a new cache entry (None: into RAM, no cache)."""
    if cache_dir is None:
        rows = read_rows(data_root, flag, require_labels)
        images = np.empty((len(rows), 3, *size), dtype=np.uint8)
        bad = {}
        for offset, block, failures in decode_blocks(rows, size, num_workers):
            images[offset : offset + len(block)] = block
            bad.update((r, f"{rows.where(r)}: {why}") for r, why in failures)
        return Decoded(images, rows, bad)
    entry = cache_dir / f"decoded-{cache_key(find_parquet_files(data_root, flag), size)}"
    cached = _read_entry(entry, size, verify)
    if cached is not None:
        log.info("decode cache hit: %s", entry)
        if require_labels and not cached.rows.labelled:
            read_rows(data_root, flag, require_labels)  # names the file without labels
        return cached
    rows = read_rows(data_root, flag, require_labels)
    try:
        _write_entry(entry, rows, size, num_workers)
    except OSError as exc:  # a cache we cannot write only costs time next run
        log.warning("could not write decode cache %s (%s); decoding without it", entry, exc.strerror or exc)
        return load_decoded(data_root, size, num_workers=num_workers, cache_dir=None, flag=flag)
    return _read_entry(entry, size, verify=False)


def _write_entry(entry: Path, rows: Rows, size: tuple[int, int], num_workers: int) -> None:
    """Decode into <cache>/.tmp-decoded-*/images.npy by plain file writes (the decoded array is never held in
    RAM), then rename the folder into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f"{TMP_PREFIX}{entry.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shape, bad, crc = (len(rows), 3, *size), {}, 0
        with (tmp / "images.npy").open("wb") as handle:
            np.lib.format.write_array_header_1_0(handle, {"descr": "|u1", "fortran_order": False, "shape": shape})
            for _, block, failures in decode_blocks(rows, size, num_workers):
                handle.write(memoryview(np.ascontiguousarray(block)).cast("B"))
                crc = crc32(block, crc)
                bad.update((r, f"{rows.where(r)}: {why}") for r, why in failures)
            handle.flush()
            os.fsync(handle.fileno())
        np.savez(
            tmp / "rows.npz",
            labels=rows.labels,
            **({"split_codes": rows.split_codes} if rows.split_codes is not None else {}),
            **({"source_codes": rows.source_codes} if rows.source_codes is not None else {}),
        )
        meta = {"shape": list(shape), "crc32": crc, "source_names": rows.source_names, "bad": sorted(bad.items())}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            tmp.rename(entry)
        except OSError:  # another run wrote the same entry meanwhile: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_entry(entry: Path, size: tuple[int, int], verify: bool = True) -> Decoded | None:
    """The cached dataset, or None when missing, stale or damaged (damaged entries are deleted)."""
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        images = np.load(entry / "images.npy", mmap_mode="c")  # copy-on-write: writable for torch, never written
        if images.shape != tuple(meta["shape"]) or images.shape[1:] != (3, *size) or images.dtype != np.uint8:
            raise ValueError(f"shape {images.shape}")
        if verify and crc32_of_file(entry / "images.npy", images.offset) != meta["crc32"]:
            raise ValueError("CRC-32 mismatch")
        with np.load(entry / "rows.npz") as arrays:
            rows = Rows(
                labels=arrays["labels"],
                split_codes=arrays["split_codes"] if "split_codes" in arrays else None,
                source_codes=arrays["source_codes"] if "source_codes" in arrays else None,
                source_names=list(meta["source_names"]),
            )
        if len(rows) != len(images):
            raise ValueError(f"{len(rows)} rows for {len(images)} images")
    except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
        log.warning("decode cache %s is damaged (%s); rebuilding it", entry, first_line(exc))
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return Decoded(images, rows, {int(r): why for r, why in meta["bad"]})
