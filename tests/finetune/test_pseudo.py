"""Pseudo-labels and predictions for parquet datasets without labels."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
import pytest
from conftest import TINY_TRAIN, config, only_run

from ocec.data.synth import write_synthetic
from ocec.finetune.pseudo import choose_confident, predict_dataset


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unlabelled")
    write_synthetic(folder / "src", 120, seed=8, style="a", with_split=False)
    table = pq.read_table(folder / "src" / "dataset.parquet")
    pq.write_table(table.drop_columns(["label", "class_id"]), folder / "rows.parquet")
    return folder


def test_pseudo_labels_round_trip_through_train(ocec, train, trained_run, data_a, unlabelled, tmp_path):
    result = ocec(
        "pseudo-label",
        "--checkpoint",
        trained_run,
        "--data_root",
        unlabelled / "rows.parquet",
        "--out",
        tmp_path / "pl",
    )
    assert result.code == 0, result.err
    assert "of 120 rows" in result.out and "--extra_train_root" in result.out
    table = pq.read_table(tmp_path / "pl" / "dataset.parquet")
    assert table.column_names == ["split", "label", "class_id", "image_bytes", "image_path", "source", "confidence"]
    assert set(table.column("split").to_pylist()) == {"train"}
    assert all(s.startswith("pseudo:synth_a_subject") for s in table.column("source").to_pylist())
    confidence = np.array(table.column("confidence").to_pylist())
    assert (confidence >= 0.9).all() and table.num_rows > 0
    # each pseudo-label is the labelling model's own prediction for that image (a mechanism, not a score:
    # how many are right depends on the model, which float rounding on another CPU may change)
    snap, rows, probs, _, _ = predict_dataset(
        [str(trained_run)],
        str(unlabelled / "rows.parquet"),
        batch_size=64,
        device="cpu",
        num_workers=0,
        cache_dir=None,
        max_bad_fraction=0.0,
    )
    source = pq.read_table(unlabelled / "rows.parquet")
    stored = snap.threshold  # labels are assigned at the checkpoint's stored threshold (--threshold auto)
    assert stored is not None and f"at threshold {stored:.3g}" in result.out
    is_open = probs[np.argsort(rows)] >= stored
    predicted = dict(zip(source.column("image_bytes").to_pylist(), is_open.astype(int)))
    pairs = list(zip(table.column("image_bytes").to_pylist(), table.column("class_id").to_pylist()))
    assert all(predicted[image] == label for image, label in pairs)
    confident = np.where(probs >= stored, probs, 1 - probs) >= 0.9
    assert table.num_rows == int(confident.sum())  # every confident row, no other
    run = train(
        data_a, tmp_path / "r", 1, *TINY_TRAIN, "--pretrain", trained_run, "--extra_train_root", tmp_path / "pl"
    )
    assert run.code == 0, run.err
    assert config(only_run(tmp_path / "r"))["train"]["extra_train_root"] == str(tmp_path / "pl")
    assert f"extra_train_root: train {table.num_rows} (open" in run.out


def test_unlabelled_data_is_refused_for_training_and_predicted(ocec, train, trained_run, unlabelled, tmp_path):
    refused = train(unlabelled / "rows.parquet", tmp_path / "r", 1, *TINY_TRAIN)
    assert refused.code == 2 and "needs a 'label' or 'class_id' column to train" in refused.err
    out = tmp_path / "p.csv"
    result = ocec("predict", "--checkpoint", trained_run, "--data_root", unlabelled / "rows.parquet", "--output", out)
    assert result.code == 0, result.err
    rows = out.read_text().splitlines()
    assert rows[0] == '"path","row","source","prob_open","predicted"' and len(rows) == 121  # no truth: no label


def test_confident_rows_and_balance():
    probs = np.array([0.99, 0.9, 0.6, 0.4, 0.2, 0.01, 0.97, 0.98, 0.05])
    assert choose_confident(probs, 0.95, False).tolist() == [0, 5, 6, 7, 8]
    assert choose_confident(probs, 0.95, True).tolist() == [0, 5, 7, 8]  # two of each class, the most confident
    assert choose_confident(probs, "auto", False).tolist() == [0, 1, 5, 6, 7, 8]  # auto: 0.9


def test_pseudo_labels_never_hold_a_val_or_test_row(ocec, trained_run, data_a, tmp_path):
    """Labelling the labelled dataset itself writes only its train rows (val/test pick the best checkpoint)."""
    result = ocec(
        "pseudo-label",
        "--checkpoint",
        trained_run,
        "--data_root",
        data_a,
        "--out",
        tmp_path / "pl",
        "--min_confidence",
        0.5,
    )
    assert result.code == 0, result.err
    source = pq.read_table(data_a / "dataset.parquet")
    held_out = {
        b
        for b, s in zip(source.column("image_bytes").to_pylist(), source.column("split").to_pylist())
        if s in ("val", "test")
    }
    written = pq.read_table(tmp_path / "pl" / "dataset.parquet").column("image_bytes").to_pylist()
    assert written and not held_out & set(written)
    assert f"left out {len(held_out)} row(s) of the data's val/test split" in result.out


def test_train_refuses_extra_train_rows_that_are_val_or_test_images(train, data_a, tmp_path):
    table = pq.read_table(data_a / "dataset.parquet")
    leaked = table.filter(pa.compute.equal(table.column("split"), "val"))
    leaked = leaked.set_column(leaked.schema.get_field_index("split"), "split", pa.array(["train"] * leaked.num_rows))
    (tmp_path / "leak").mkdir()
    pq.write_table(leaked, tmp_path / "leak" / "dataset.parquet")
    result = train(data_a, tmp_path / "r", 1, *TINY_TRAIN, "--extra_train_root", tmp_path / "leak")
    assert result.code == 2
    assert f"{leaked.num_rows} of its {leaked.num_rows} train images are also in the val/test split" in result.err


def test_threshold_assigns_labels_and_min_confidence_chooses_rows(ocec, trained_run, unlabelled, tmp_path):
    """--threshold means what it means in eval/predict/export (the decision); --min_confidence the floor."""
    common = ["--checkpoint", trained_run, "--data_root", unlabelled / "rows.parquet", "--min_confidence", 0]
    assert ocec("pseudo-label", *common, "--threshold", 0.0, "--out", tmp_path / "all_open").code == 0
    labels = pq.read_table(tmp_path / "all_open" / "dataset.parquet").column("class_id").to_pylist()
    assert len(labels) == 120 and set(labels) == {1}
    refused = ocec("pseudo-label", *common[:-2], "--min_confidence", 1.0, "--out", tmp_path / "none")
    assert refused.code == 2 and "--min_confidence 1.0: no prediction is that confident" in refused.err
