"""`ocec synth`: the same data whatever the workers and shards, streamed to disk, with a progress bar."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from ocec.data.synth import write_synthetic


def _table(folder):
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))])


def test_synth_command_writes_shards_without_split(ocec, tmp_path):
    result = ocec("synth", "--out", tmp_path, "--rows", 30, "--shards", 3, "--no_split", "--style", "b")
    assert result.code == 0, result.err
    tables = [pq.read_table(p) for p in sorted(tmp_path.glob("part-*.parquet"))]
    assert len(tables) == 3 and sum(t.num_rows for t in tables) == 30
    assert "split" not in tables[0].column_names and set(tables[0].column("label").to_pylist()) <= {"open", "closed"}
    assert not list(tmp_path.glob(".tmp-*"))


def test_the_data_does_not_depend_on_workers_or_shards(tmp_path, monkeypatch):
    import ocec.data.synth as synth

    monkeypatch.setattr(synth, "IN_PROCESS_ROWS", 10)  # use worker processes even for a small dataset
    monkeypatch.setattr(synth, "CHUNK_ROWS", 7)
    write_synthetic(tmp_path / "one", 50, seed=3, style="b")
    write_synthetic(tmp_path / "many", 50, seed=3, style="b", shards=4, num_workers=2)
    assert _table(tmp_path / "one").equals(_table(tmp_path / "many"))
    write_synthetic(tmp_path / "other", 50, seed=4, style="b")
    assert not _table(tmp_path / "one").equals(_table(tmp_path / "other"))


def test_synth_shows_progress_on_a_terminal(ocec, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    result = ocec("synth", "--out", tmp_path, "--rows", 40)
    assert result.code == 0, result.err
    assert "synth" in result.err and "/40" in result.err and "img/s" in result.err
