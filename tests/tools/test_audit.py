"""`ocec audit` (cross-fitted predictions ranked by cleanlab), acting on it with train --exclude/--relabel,
and eval --gallery."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY, run_subprocess
from PIL import Image

from ocec.data.synth import write_synthetic
from ocec.tools.gallery import CAPTION, TILE, confident_mistakes

pytest.importorskip("cleanlab", reason="the audit extra is not installed")

AUDIT = ["--folds", 3, "--epochs", 6, *TINY]


@pytest.fixture(scope="module")
def flipped(tmp_path_factory) -> tuple[Path, set]:
    """360 easy synthetic crops with 8 train labels flipped on purpose -> (folder, the flipped paths)."""
    folder = tmp_path_factory.mktemp("flipped")
    write_synthetic(folder, 360, seed=11, style="a")
    table = pq.read_table(folder / "dataset.parquet")
    ids = table.column("class_id").to_numpy().copy()
    splits = table.column("split").to_pylist()
    chosen = [i for i in range(len(ids)) if splits[i] == "train"][::25][:8]
    ids[chosen] = 1 - ids[chosen]
    table = table.set_column(table.schema.get_field_index("class_id"), "class_id", pa.array(ids))
    table = table.set_column(
        table.schema.get_field_index("label"), "label", pa.array(["open" if v else "closed" for v in ids])
    )
    pq.write_table(table, folder / "dataset.parquet")
    return folder, {table.column("image_path")[i].as_py() for i in chosen}


def _audit(data: Path, out: Path, background: bool = False):
    args = [sys.executable, "-m", "ocec", "audit", "--data_root", data, "--output_dir", out, *AUDIT]
    if background:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    return run_subprocess(*args[3:], timeout=600)


def test_an_audit_killed_midway_continues_and_ranks_the_flipped_labels_at_the_top(flipped, tmp_path):
    data, wrong = flipped
    proc = _audit(data, tmp_path, background=True)
    deadline = time.time() + 300
    while not (tmp_path / "fold_0" / "oof.npz").exists():
        assert time.time() < deadline and proc.poll() is None, "fold 0 did not finish"
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    first = (tmp_path / "fold_0" / "oof.npz").stat().st_mtime_ns
    result = _audit(data, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 done before" in result.stdout and (tmp_path / "fold_0" / "oof.npz").stat().st_mtime_ns == first
    ranked = list(csv.DictReader((tmp_path / "label_issues.csv").open()))
    assert [int(r["rank"]) for r in ranked] == list(range(1, len(ranked) + 1))
    top = {r["image_path"] for r in ranked[:12]}
    assert len(top & wrong) >= 6, (len(top & wrong), ranked[:12])  # measured: 8 of 8 in the top 12
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rows_audited"] == 360 and summary["flagged"] == len(ranked)
    assert set(summary["per_split"]) == {"train", "val", "test"} and summary["folds_grouped_by_source"] is True
    out_of_fold = list(csv.DictReader((tmp_path / "out_of_fold.csv").open()))
    assert len(out_of_fold) == 360 and sum(int(r["flagged"]) for r in out_of_fold) == len(ranked)
    with Image.open(tmp_path / "suspects.png") as picture:
        assert picture.width >= 6 * 32 * TILE  # a sheet per class, six crops across


def test_exclude_and_relabel_change_exactly_the_listed_rows(train, data_a, tmp_path):
    table = pq.read_table(data_a / "dataset.parquet", columns=["image_path", "split", "class_id"]).to_pylist()
    train_open = [r["image_path"] for r in table if r["split"] == "train" and r["class_id"] == 1]
    val_rows = [r["image_path"] for r in table if r["split"] == "val"]
    listed = tmp_path / "drop.csv"  # ranked: the last line is rank 1
    listed.write_text(
        "rank,image_path\n3,nowhere.png\n2," + val_rows[0] + "\n1," + train_open[0] + "\n4," + train_open[1] + "\n"
    )
    result = train(data_a, tmp_path / "a", 1, *TINY, "--exclude", listed)
    assert result.code == 0, result.err
    assert "--exclude: 3 row(s) dropped (train 2, val 1, test 0); 1 listed path(s) not in the data" in result.out
    assert "train 171 (open 92), val 35" in result.out  # 173 (open 94) and 36 without it
    result = train(data_a, tmp_path / "b", 1, *TINY, "--exclude", listed, "--exclude_top", 2)
    assert "--exclude: 2 row(s) dropped (train 1, val 1, test 0)" in result.out and "train 172 (open 93)" in result.out
    flips = tmp_path / "flip.txt"
    flips.write_text("\n".join(train_open[:3]) + "\n")
    result = train(data_a, tmp_path / "c", 1, *TINY, "--relabel", flips)
    assert (
        "--relabel: 3 label(s) flipped (train 3, val 0, test 0)" in result.out and "train 173 (open 91)" in result.out
    )
    result = train(data_a, tmp_path / "d", 1, *TINY, "--exclude_top", 2)
    assert result.code == 2 and "--exclude_top must be >= 1 and needs --exclude FILE" in result.err


def test_audit_without_cleanlab_says_how_to_install(ocec, data_a, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cleanlab", None)
    result = ocec("audit", "--data_root", data_a, "--output_dir", tmp_path, *AUDIT)
    assert (
        result.code == 2
        and result.err.strip() == "ocec audit: error: ocec audit needs cleanlab: pip install 'ocec[audit]'"
    )
    assert not any(tmp_path.iterdir())


def test_confident_mistakes_are_the_most_confident_wrong_calls():
    labels = np.array([0, 0, 0, 1, 1, 1, 0])
    probs = np.array([0.9, 0.6, 0.2, 0.1, 0.45, 0.8, 0.99])
    fp, fn = confident_mistakes(labels, probs, 0.5, count=2)
    assert fp.tolist() == [6, 0] and fn.tolist() == [3, 4]


def test_eval_gallery_shows_as_many_mistakes_as_the_report_counts(ocec, trained_run, data_b, tmp_path):
    out, report = tmp_path / "g.png", tmp_path / "r.json"
    result = ocec("eval", "--checkpoint", trained_run, "--data_root", data_b, "--gallery", out, "--json", report)
    assert result.code == 0, result.err
    full = json.loads(report.read_text())
    matrix = full["overall"]["confusion_matrix"]
    rows = sum(max(1, -(-min(18, matrix[k]) // 6)) for k in ("fp", "fn"))  # 6 crops per row, 18 at most each
    sheets = 2 * 24 + rows * (16 * TILE + CAPTION + 8)
    table = 12 + 14 * (2 + len(full["per_source"]))  # the per-source panel beside the sheets
    with Image.open(out) as picture:
        assert picture.height == max(sheets, table) and picture.width > 6 * 32 * TILE
