"""Datasets: seeded splits, splits as index arrays into shared images, training data and its errors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ocec.core.errors import UserError
from ocec.data.dataset import assign_splits, load_dataset
from ocec.data.synth import write_synthetic

SIZE = (16, 32)


def _load(root, cache_dir=None, **kwargs):
    options = {"ratios": (0.8, 0.1, 0.1), "seed": 42, "num_workers": 0, "max_bad_fraction": 0.01, **kwargs}
    return load_dataset(root, SIZE, cache_dir=cache_dir, **options)


def _all_images(dataset):
    return torch.cat([dataset.splits[s].take(slice(None)) for s in ("train", "val", "test")])


def test_file_and_directory_of_shards_read_the_same_rows(tmp_path):
    write_synthetic(tmp_path / "one", 60, seed=3, style="a")
    write_synthetic(tmp_path / "shards", 60, seed=3, style="a", shards=3)
    single = _load(tmp_path / "one" / "dataset.parquet")
    sharded = _load(tmp_path / "shards")
    for split in ("train", "val", "test"):
        assert torch.equal(single.splits[split].labels, sharded.splits[split].labels)
        assert torch.equal(single.splits[split].take(slice(None)), sharded.splits[split].take(slice(None)))


def test_splits_are_index_arrays_into_one_shared_array(tmp_path):
    write_synthetic(tmp_path / "d", 60, seed=3, style="a")
    data = _load(tmp_path / "d", tmp_path / "cache")
    train, val = data.splits["train"], data.splits["val"]
    assert train.images is val.images and train.images.shape[0] == 60  # one array, not per-split copies
    assert set(train.rows.tolist()).isdisjoint(val.rows.tolist())
    assert torch.equal(train.take(torch.tensor([2, 0])), train.images[train.rows[[2, 0]]])
    assert sum(len(b) for b in val.batches(4)) == len(val)


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
    assert torch.equal(first.splits["val"].rows, again.splits["val"].rows)
    assert not torch.equal(first.splits["val"].rows, other.splits["val"].rows)


def test_source_grouped_split_keeps_each_source_on_one_side():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 30, size=600)
    labels = rng.integers(0, 2, size=600)
    splits = assign_splits(labels, groups, (0.8, 0.1, 0.1), seed=3)
    for g in set(groups.tolist()):
        assert len(set(splits[groups == g].tolist())) == 1, g
    counts = {code: int((splits == code).sum()) for code in (0, 1, 2)}
    assert counts[1] > 20 and counts[2] > 20 and counts[0] > 400


def test_too_few_sources_falls_back_to_a_row_split(caplog):
    labels = np.array([0, 1] * 50)
    groups = np.zeros(100, dtype=np.int32)
    splits = assign_splits(labels, groups, (0.8, 0.2, 0.0), seed=0)
    assert (splits == 1).sum() == 20 and "too few" in caplog.text


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
