"""Parquet reading, splitting, decoding once and the decode cache."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import ocec.data as data_mod
from ocec.data import assign_splits, load_dataset, read_table
from ocec.errors import UserError
from ocec.synth import write_synthetic

SIZE = (16, 32)


def _load(root, cache_dir=None, **kwargs):
    options = {"ratios": (0.8, 0.1, 0.1), "seed": 42, "num_workers": 0, "max_bad_fraction": 0.01, **kwargs}
    return load_dataset(root, SIZE, cache_dir=cache_dir, **options)


def _all_images(dataset):
    return torch.cat([dataset.splits[s].images for s in ("train", "val", "test")])


def test_file_and_directory_of_shards_read_the_same_rows(tmp_path):
    write_synthetic(tmp_path / "one", 60, seed=3, style="a")
    write_synthetic(tmp_path / "shards", 60, seed=3, style="a", shards=3)
    single = _load(tmp_path / "one" / "dataset.parquet")
    sharded = _load(tmp_path / "shards")
    assert len(read_table(tmp_path / "shards").files) == 3
    for split in ("train", "val", "test"):
        assert torch.equal(single.splits[split].labels, sharded.splits[split].labels)
        assert torch.equal(single.splits[split].images, sharded.splits[split].images)


def test_shards_in_nested_folders_are_read_sorted(tmp_path):
    write_synthetic(tmp_path / "x" / "b", 20, seed=1, style="a")
    write_synthetic(tmp_path / "x" / "a", 30, seed=2, style="a")
    table = read_table(tmp_path / "x")
    assert [f.parent.name for f in table.files] == ["a", "b"]
    assert len(table) == 50


def test_image_paths_decode_like_image_bytes(tmp_path):
    write_synthetic(tmp_path / "bytes", 40, seed=5, style="b")
    write_synthetic(tmp_path / "paths", 40, seed=5, style="b", embed_bytes=False)
    assert pq.read_table(tmp_path / "paths" / "dataset.parquet").column("image_bytes").null_count == 40
    assert torch.equal(_all_images(_load(tmp_path / "bytes")), _all_images(_load(tmp_path / "paths")))


def test_labels_aliases_and_class_id_wins(tmp_path):
    write_synthetic(tmp_path / "d", 12, seed=0, style="a")
    table = pq.read_table(tmp_path / "d" / "dataset.parquet")
    class_id = table.column("class_id").to_pylist()
    # label says the opposite in a mixed spelling; class_id must win.
    flipped = ["Closed" if c else " OPEN" for c in class_id]
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(flipped))
    pq.write_table(table, tmp_path / "both.parquet")
    assert read_table(tmp_path / "both.parquet").labels.tolist() == class_id
    # label only, with aliases 'open'/'closed'/'1'/'0'
    aliases = ["open", "closed", "1", "0"] * 3
    pq.write_table(
        table.drop_columns(["class_id"]).set_column(table.schema.get_field_index("label"), "label", pa.array(aliases)),
        tmp_path / "label_only.parquet",
    )
    assert read_table(tmp_path / "label_only.parquet").labels.tolist() == [1, 0, 1, 0] * 3


def test_split_aliases_and_unknown_splits_are_skipped(tmp_path, caplog):
    write_synthetic(tmp_path / "d", 24, seed=0, style="a")
    table = pq.read_table(tmp_path / "d" / "dataset.parquet")
    splits = ["training", "validation", "dev", "valid", "Test", "holdout"] * 4
    table = table.set_column(0, "split", pa.array(splits))
    pq.write_table(table, tmp_path / "aliased.parquet")
    ds = _load(tmp_path / "aliased.parquet")
    assert [len(ds.splits[s]) for s in ("train", "val", "test")] == [4, 12, 4]
    assert ds.skipped_split == 4
    assert "other than train/val/test" in caplog.text


def test_no_split_column_makes_a_seeded_stratified_split(tmp_path):
    write_synthetic(tmp_path / "d", 200, seed=0, style="a", with_split=False)
    table = pq.read_table(tmp_path / "d" / "dataset.parquet").drop_columns(["source"])
    pq.write_table(table, tmp_path / "nosource.parquet")
    first = _load(tmp_path / "nosource.parquet", ratios=(0.6, 0.2, 0.2), seed=7)
    again = _load(tmp_path / "nosource.parquet", ratios=(0.6, 0.2, 0.2), seed=7)
    other = _load(tmp_path / "nosource.parquet", ratios=(0.6, 0.2, 0.2), seed=8)
    sizes = [len(first.splits[s]) for s in ("train", "val", "test")]
    assert abs(sizes[0] - 120) <= 2 and abs(sizes[1] - 40) <= 2 and sum(sizes) == 200
    open_share = [float(first.splits[s].labels.float().mean()) for s in ("train", "val", "test")]
    assert max(open_share) - min(open_share) < 0.05  # stratified
    assert torch.equal(first.splits["val"].images, again.splits["val"].images)
    assert not torch.equal(first.splits["val"].images, other.splits["val"].images)


def test_source_grouped_split_keeps_each_source_on_one_side():
    rng = np.random.default_rng(0)
    groups = np.array([f"s{i}" for i in rng.integers(0, 30, size=600)], dtype=object)
    labels = rng.integers(0, 2, size=600)
    splits = assign_splits(labels, groups, (0.8, 0.1, 0.1), seed=3)
    for g in set(groups):
        assert len(set(splits[groups == g])) == 1, g
    counts = {s: int((splits == s).sum()) for s in ("train", "val", "test")}
    assert counts["val"] > 20 and counts["test"] > 20 and counts["train"] > 400


def test_too_few_sources_falls_back_to_a_row_split(caplog):
    labels = np.array([0, 1] * 50)
    groups = np.array(["public"] * 100, dtype=object)
    splits = assign_splits(labels, groups, (0.8, 0.2, 0.0), seed=0)
    assert (splits == "val").sum() == 20 and "too few" in caplog.text


def test_decode_cache_is_reused_and_invalidated_when_a_file_changes(tmp_path, monkeypatch):
    write_synthetic(tmp_path / "d", 30, seed=0, style="a")
    cache = tmp_path / "cache"
    calls = []
    real = data_mod.decode_all
    monkeypatch.setattr(data_mod, "decode_all", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = _load(tmp_path / "d", cache)
    second = _load(tmp_path / "d", cache)
    assert len(calls) == 1 and len(list(cache.glob("decoded-*.npz"))) == 1
    assert torch.equal(_all_images(first), _all_images(second))
    parquet = tmp_path / "d" / "dataset.parquet"
    write_synthetic(tmp_path / "d", 30, seed=1, style="a")  # same path, new content and mtime
    os.utime(parquet, ns=(parquet.stat().st_mtime_ns + 10**9,) * 2)
    third = _load(tmp_path / "d", cache)
    assert len(calls) == 2
    assert not torch.equal(_all_images(first), _all_images(third))
    _load(tmp_path / "d", cache, num_workers=0)
    assert len(calls) == 2


def test_a_corrupted_cache_is_detected_and_rebuilt(tmp_path, caplog):
    write_synthetic(tmp_path / "d", 30, seed=0, style="a")
    cache = tmp_path / "cache"
    clean = _all_images(_load(tmp_path / "d", cache))
    (path,) = cache.glob("decoded-*.npz")
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(64)  # flip bytes inside the image array
    path.write_bytes(bytes(raw))
    assert torch.equal(_all_images(_load(tmp_path / "d", cache)), clean)
    assert "damaged" in caplog.text
    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert torch.equal(_all_images(_load(tmp_path / "d", cache)), clean)


def test_parallel_decoding_matches_in_process(tmp_path, monkeypatch):
    write_synthetic(tmp_path / "d", 80, seed=4, style="b")
    serial = _all_images(_load(tmp_path / "d"))
    monkeypatch.setattr(data_mod, "IN_PROCESS_ROWS", 10)
    monkeypatch.setattr(data_mod, "DECODE_CHUNK", 16)
    parallel = _all_images(_load(tmp_path / "d", num_workers=2))
    assert torch.equal(serial, parallel)


def test_bad_images_are_skipped_counted_and_limited(tmp_path, caplog):
    write_synthetic(tmp_path / "d", 100, seed=0, style="a")
    table = pq.read_table(tmp_path / "d" / "dataset.parquet")
    blobs = table.column("image_bytes").to_pylist()
    blobs[3] = b"not a png"
    blobs[7] = blobs[7][:40]  # truncated PNG
    table = table.set_column(table.schema.get_field_index("image_bytes"), "image_bytes", pa.array(blobs, pa.binary()))
    pq.write_table(table, tmp_path / "bad.parquet")
    ds = _load(tmp_path / "bad.parquet", max_bad_fraction=0.05)
    assert ds.skipped_bad == 2 and sum(len(s) for s in ds.splits.values()) == 98
    assert "bad.parquet row 3" in caplog.text
    with pytest.raises(UserError, match=r"2 of 100 images unreadable .*max_bad_fraction"):
        _load(tmp_path / "bad.parquet", max_bad_fraction=0.01)


def test_images_are_uint8_at_the_requested_size(tmp_path):
    write_synthetic(tmp_path / "d", 20, seed=0, style="a")
    ds = load_dataset(
        tmp_path / "d", (24, 40), ratios=(0.8, 0.1, 0.1), seed=0, num_workers=0, cache_dir=None, max_bad_fraction=0
    )
    split = ds.splits["train"]
    assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 24, 40)
    assert split.labels.dtype == torch.int64
