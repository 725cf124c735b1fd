"""Decoding once, and the cache: memory-mapped, keyed cheaply, verified, rebuilt when damaged."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import ocec.data.decode as decode_mod
from ocec.data.decode import load_decoded
from ocec.data.synth import write_synthetic

SIZE = (16, 32)


def _load(root, cache=None, **kwargs):
    return load_decoded(root, SIZE, num_workers=kwargs.pop("num_workers", 0), cache_dir=cache, **kwargs)


def test_image_paths_decode_like_image_bytes(tmp_path):
    write_synthetic(tmp_path / "bytes", 40, seed=5, style="b")
    write_synthetic(tmp_path / "paths", 40, seed=5, style="b", embed_bytes=False)
    assert pq.read_table(tmp_path / "paths" / "dataset.parquet").column("image_bytes").null_count == 40
    assert np.array_equal(_load(tmp_path / "bytes").images, _load(tmp_path / "paths").images)


def test_a_cache_hit_reads_no_parquet_column_and_memory_maps(tmp_path, monkeypatch):
    write_synthetic(tmp_path / "d", 30, seed=0, style="a")
    cache = tmp_path / "cache"
    first = _load(tmp_path / "d", cache)
    (entry,) = cache.glob("decoded-*")
    assert sorted(p.name for p in entry.iterdir()) == ["images.npy", "meta.json", "rows.npz"]
    monkeypatch.setattr(decode_mod, "read_rows", lambda *a, **k: pytest.fail("a cache hit read the parquet"))
    monkeypatch.setattr(decode_mod, "decode_blocks", lambda *a, **k: pytest.fail("a cache hit decoded"))
    second = _load(tmp_path / "d", cache)
    assert isinstance(second.images, np.memmap) and np.array_equal(first.images, second.images)
    assert np.array_equal(first.rows.labels, second.rows.labels)
    assert np.array_equal(first.rows.split_codes, second.rows.split_codes)
    assert second.rows.sources(np.arange(30)).tolist() == first.rows.sources(np.arange(30)).tolist()


def test_the_cache_is_invalidated_when_a_file_or_the_size_changes(tmp_path, monkeypatch):
    write_synthetic(tmp_path / "d", 30, seed=0, style="a")
    cache = tmp_path / "cache"
    calls = []
    real = decode_mod.decode_blocks
    monkeypatch.setattr(decode_mod, "decode_blocks", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = _load(tmp_path / "d", cache).images.copy()
    _load(tmp_path / "d", cache)
    assert len(calls) == 1
    parquet = tmp_path / "d" / "dataset.parquet"
    mtime = parquet.stat().st_mtime_ns
    write_synthetic(tmp_path / "d", 30, seed=1, style="a")  # same path, new content
    os.utime(parquet, ns=(mtime, mtime))  # even with the old mtime: the footer differs
    third = _load(tmp_path / "d", cache).images
    assert len(calls) == 2 and not np.array_equal(first, third)
    load_decoded(tmp_path / "d", (24, 40), num_workers=0, cache_dir=cache)
    assert len(calls) == 3 and len(list(cache.glob("decoded-*"))) == 3


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated", "missing meta"])
def test_a_damaged_cache_is_detected_and_rebuilt(tmp_path, caplog, damage):
    write_synthetic(tmp_path / "d", 30, seed=0, style="a")
    cache = tmp_path / "cache"
    clean = _load(tmp_path / "d", cache).images.copy()
    (entry,) = cache.glob("decoded-*")
    images = entry / "images.npy"
    if damage == "flipped bytes":
        raw = bytearray(images.read_bytes())
        middle = len(raw) // 2
        raw[middle : middle + 64] = bytes(b ^ 0xFF for b in raw[middle : middle + 64])
        images.write_bytes(bytes(raw))
    elif damage == "truncated":
        images.write_bytes(images.read_bytes()[:1000])
    else:
        (entry / "meta.json").unlink()
    assert np.array_equal(_load(tmp_path / "d", cache).images, clean)
    assert "damaged" in caplog.text and "rebuilding" in caplog.text


def test_parallel_decoding_matches_in_process(tmp_path, monkeypatch):
    write_synthetic(tmp_path / "d", 80, seed=4, style="b")
    serial = _load(tmp_path / "d").images
    monkeypatch.setattr(decode_mod, "IN_PROCESS_ROWS", 10)
    monkeypatch.setattr(decode_mod, "DECODE_CHUNK", 16)
    assert np.array_equal(serial, _load(tmp_path / "d", tmp_path / "c", num_workers=2).images)


def test_unreadable_images_are_recorded_with_file_and_row(tmp_path):
    write_synthetic(tmp_path / "d", 20, seed=0, style="a")
    table = pq.read_table(tmp_path / "d" / "dataset.parquet")
    blobs = table.column("image_bytes").to_pylist()
    blobs[3] = b"not a png"
    table = table.set_column(table.schema.get_field_index("image_bytes"), "image_bytes", pa.array(blobs, pa.binary()))
    pq.write_table(table, tmp_path / "bad.parquet")
    for cache in (None, tmp_path / "cache", tmp_path / "cache"):  # in RAM, written, read back
        decoded = _load(tmp_path / "bad.parquet", cache)
        assert list(decoded.bad) == [3] and decoded.bad[3].startswith(f"{tmp_path / 'bad.parquet'} row 3: undecodable")


def test_images_are_uint8_at_the_requested_size(tmp_path):
    write_synthetic(tmp_path / "d", 20, seed=0, style="a")
    decoded = load_decoded(tmp_path / "d", (24, 40), num_workers=0, cache_dir=None)
    assert decoded.images.dtype == np.uint8 and decoded.images.shape == (20, 3, 24, 40)
    assert torch.from_numpy(decoded.images).shape == (20, 3, 24, 40)
