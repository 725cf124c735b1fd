"""Reading parquet metadata: files and folders, label and split aliases, sources, unlabelled data."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ocec.core.errors import UserError
from ocec.data.parquet import SPLITS, read_rows
from ocec.data.synth import write_synthetic


def test_shards_in_nested_folders_are_read_sorted(tmp_path):
    write_synthetic(tmp_path / "x" / "b", 20, seed=1, style="a")
    write_synthetic(tmp_path / "x" / "a", 30, seed=2, style="a")
    rows = read_rows(tmp_path / "x")
    assert [f.parent.name for f in rows.files] == ["a", "b"]
    assert len(rows) == 50 and rows.where(35) == f"{rows.files[1]} row 5"


def test_labels_aliases_and_class_id_wins(tmp_path):
    write_synthetic(tmp_path / "d", 12, seed=0, style="a")
    table = pq.read_table(tmp_path / "d" / "dataset.parquet")
    class_id = table.column("class_id").to_pylist()
    # label says the opposite in a mixed spelling; class_id must win.
    flipped = ["Closed" if c else " OPEN" for c in class_id]
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(flipped))
    pq.write_table(table, tmp_path / "both.parquet")
    assert read_rows(tmp_path / "both.parquet").labels.tolist() == class_id
    # label only, with aliases 'open'/'closed'/'1'/'0'
    aliases = ["open", "closed", "1", "0"] * 3
    pq.write_table(
        table.drop_columns(["class_id"]).set_column(table.schema.get_field_index("label"), "label", pa.array(aliases)),
        tmp_path / "label_only.parquet",
    )
    assert read_rows(tmp_path / "label_only.parquet").labels.tolist() == [1, 0, 1, 0] * 3


def test_split_aliases_become_codes(tmp_path):
    write_synthetic(tmp_path / "d", 6, seed=0, style="a")
    table = pq.read_table(tmp_path / "d" / "dataset.parquet")
    table = table.set_column(0, "split", pa.array(["training", "validation", "dev", "valid", "Test", "holdout"]))
    pq.write_table(table, tmp_path / "aliased.parquet")
    codes = read_rows(tmp_path / "aliased.parquet").split_codes.tolist()
    assert [SPLITS[c] if c >= 0 else None for c in codes] == ["train", "val", "val", "val", "test", None]


def test_sources_become_codes_in_name_order_across_files(tmp_path):
    write_synthetic(tmp_path / "x" / "a", 20, seed=1, style="a")
    write_synthetic(tmp_path / "x" / "b", 20, seed=2, style="b")
    rows = read_rows(tmp_path / "x")
    names = [pq.read_table(f).column("source").to_pylist() for f in rows.files]
    assert rows.sources(range(40)).tolist() == names[0] + names[1]
    assert rows.source_names == sorted(rows.source_names)


def test_unlabelled_data_is_read_only_when_allowed(tmp_path):
    write_synthetic(tmp_path / "d", 10, seed=0, style="a")
    table = pq.read_table(tmp_path / "d" / "dataset.parquet").drop_columns(["label", "class_id"])
    pq.write_table(table, tmp_path / "unlabelled.parquet")
    with pytest.raises(UserError, match="needs a 'label' or 'class_id' column to train or evaluate on"):
        read_rows(tmp_path / "unlabelled.parquet")
    rows = read_rows(tmp_path / "unlabelled.parquet", require_labels=False)
    assert rows.labels.tolist() == [-1] * 10 and not rows.labelled
