"""Judging a model: eval (overall and per source), compare (one split for every run), predict."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import FIXTURES, TINY, only_run, summary
from sklearn.metrics import f1_score, roc_auc_score

from ocec.data.dataset import load_dataset
from ocec.data.synth import write_synthetic
from ocec.engine.inference import predict_split
from ocec.finetune.pretrained import load_for_inference

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_all(root, image_size):
    data = load_dataset(
        root, image_size, ratios=(0.8, 0.1, 0.1), seed=42, num_workers=0, cache_dir=None, max_bad_fraction=0.01
    )
    every = data.all()
    return every, every.labels.numpy()


def test_eval_cli_matches_a_direct_computation_and_sources_add_up(ocec, trained_run, data_a, tmp_path):
    out = tmp_path / "eval.json"
    result = ocec(
        "eval", "--checkpoint", trained_run, "--data_root", data_a, "--split", "all", "--json", out, "--device", "cpu"
    )
    assert result.code == 0, result.err
    report = json.loads(out.read_text())
    assert "overall" in result.out and "confusion matrix" in result.out
    # recompute independently: the chosen checkpoint, every row of the dataset, scikit-learn
    model, snap, _ = load_for_inference([str(trained_run)], torch.device("cpu"))
    images, labels = _load_all(data_a, snap.model_config.image_size)  # the 'all' split
    probs = torch.sigmoid(predict_split(model, images, batch_size=64, device=torch.device("cpu"))[0]).numpy()
    assert report["overall"]["samples"] == len(labels) == 240
    assert report["overall"]["f1"] == pytest.approx(f1_score(labels, probs >= 0.5))
    assert report["overall"]["roc_auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-6)
    per_source = report["per_source"]
    assert len(per_source) > 5
    assert sum(r["samples"] for r in per_source.values()) == 240
    for key in ("tp", "fp", "tn", "fn"):
        assert (
            sum(r["confusion_matrix"][key] for r in per_source.values()) == report["overall"]["confusion_matrix"][key]
        )


def test_eval_of_the_upstream_checkpoint(ocec, tmp_path):
    write_synthetic(tmp_path / "d", 60, seed=0, style="a")
    result = ocec(
        "eval",
        "--checkpoint",
        FIXTURES / "upstream_baseline.pt",
        "--data_root",
        tmp_path / "d",
        "--split",
        "all",
        "--device",
        "cpu",
    )
    assert result.code == 0, result.err
    assert "(upstream)" in result.out


def test_predict_csv_matches_eval_on_the_same_images(ocec, trained_run, tmp_path):
    write_synthetic(tmp_path / "d", 60, seed=9, style="a", embed_bytes=False)
    csv_path = tmp_path / "preds.csv"
    result = ocec(
        "predict",
        "--checkpoint",
        trained_run,
        "--inputs",
        tmp_path / "d" / "images",
        "--output",
        csv_path,
        "--device",
        "cpu",
    )
    assert result.code == 0, result.err
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 60 and list(rows[0]) == ["path", "row", "source", "prob_open", "predicted"]
    table = pq.read_table(tmp_path / "d" / "dataset.parquet")
    truth = dict(zip(table.column("image_path").to_pylist(), table.column("class_id").to_pylist()))
    labels = np.array([truth[str(Path(r["path"]).relative_to(tmp_path / "d"))] for r in rows])
    preds = np.array([r["predicted"] == "open" for r in rows])
    assert all((float(r["prob_open"]) >= 0.5) == (r["predicted"] == "open") for r in rows)
    out = tmp_path / "eval.json"
    assert (
        ocec(
            "eval",
            "--checkpoint",
            trained_run,
            "--data_root",
            tmp_path / "d",
            "--split",
            "all",
            "--json",
            out,
            "--device",
            "cpu",
        ).code
        == 0
    )
    assert json.loads(out.read_text())["overall"]["f1"] == pytest.approx(f1_score(labels, preds))


def test_predict_skips_unreadable_files_with_a_warning(ocec, trained_run, tmp_path):
    write_synthetic(tmp_path / "d", 4, seed=9, style="a", embed_bytes=False)
    (tmp_path / "d" / "images" / "broken.png").write_bytes(b"nope")
    result = ocec("predict", "--checkpoint", trained_run, "--inputs", tmp_path / "d" / "images", "--device", "cpu")
    assert result.code == 0 and "1 unreadable file(s) skipped" in result.out
    assert len([ln for ln in result.out.splitlines() if ln.endswith((',"open"', ',"closed"'))]) == 4


def test_compare_reads_runs_evaluates_them_and_plots(ocec, trained_run, bce_run, data_b, tmp_path):
    plot = tmp_path / "curves.png"
    table = tmp_path / "compare.json"
    result = ocec(
        "compare",
        trained_run,
        bce_run,
        FIXTURES / "upstream_baseline.pt",
        "--device",
        "cpu",
        "--plot",
        plot,
        "--json",
        table,
    )
    assert result.code == 0, result.err
    assert plot.read_bytes()[:8] == PNG_MAGIC and "(8 lines)" in result.out  # 2 runs x (F1, 2 losses, LR)
    rows = json.loads(table.read_text())
    info = summary(trained_run)
    assert rows[0]["best_val_f1"] == pytest.approx(info["best_f1"]) and rows[0]["epochs"] == 3
    assert rows[0]["seconds"] == pytest.approx(info["wall_seconds"]) and rows[0]["images_per_s"] > 0
    assert rows[2]["best_val_f1"] == pytest.approx(0.8759, abs=1e-4)  # the upstream checkpoint's recorded F1
    result = ocec(
        "compare", trained_run, bce_run, "--data_root", data_b, "--split", "all", "--device", "cpu", "--json", table
    )
    assert result.code == 0, result.err
    rows = json.loads(table.read_text())
    direct = ocec(
        "eval",
        "--checkpoint",
        info["best_checkpoint"],
        "--data_root",
        data_b,
        "--split",
        "all",
        "--device",
        "cpu",
        "--json",
        tmp_path / "e.json",
    )
    assert direct.code == 0
    assert rows[0]["data_f1"] == pytest.approx(json.loads((tmp_path / "e.json").read_text())["overall"]["f1"])
    assert "F1 on data" in result.out


def test_compare_scores_every_run_on_the_same_rows(ocec, train, tmp_path):
    """Data without a split column: runs trained with different seeds split it differently; compare
    must score them all on one split, or their numbers are not comparable."""
    write_synthetic(tmp_path / "d", 200, seed=4, style="a", with_split=False)
    for seed in (1, 2):
        assert train(tmp_path / "d", tmp_path / f"r{seed}", 1, *TINY, "--seed", seed).code == 0
    runs = [only_run(tmp_path / f"r{seed}") for seed in (1, 2)]
    samples = []
    for run in runs:  # `eval` of each run alone: its own seed's val split
        out = tmp_path / f"{run.parent.name}.json"
        assert ocec("eval", "--checkpoint", run, "--data_root", tmp_path / "d", "--json", out).code == 0
        samples.append(json.loads(out.read_text())["overall"])
    result = ocec("compare", *runs, "--data_root", tmp_path / "d", "--json", tmp_path / "c.json")
    assert result.code == 0, result.err
    assert "every run is scored on the same rows" in result.out and "seed 1" in result.out
    rows = json.loads((tmp_path / "c.json").read_text())
    assert rows[0]["data_f1"] == pytest.approx(samples[0]["f1"])  # run 1's own split, used for both
    model, snap, _ = load_for_inference([str(runs[1])], torch.device("cpu"))
    data = load_dataset(
        tmp_path / "d", (16, 32), ratios=(0.8, 0.1, 0.1), seed=1, num_workers=0, cache_dir=None, max_bad_fraction=0.01
    )
    probs = torch.sigmoid(predict_split(model, data.splits["val"], batch_size=64, device=torch.device("cpu"))[0])
    assert rows[1]["data_f1"] == pytest.approx(f1_score(data.splits["val"].labels.numpy(), probs.numpy() >= 0.5))


def test_per_source_metrics_group_rows_once(monkeypatch):
    """Per-source evaluation must not compare every row with every source (O(rows x sources))."""
    from ocec.core.config import ModelConfig
    from ocec.data.dataset import Split
    from ocec.finetune.pretrained import Snapshot
    from ocec.tools.evaluate import report_predictions

    comparisons = []

    class CountingArray(np.ndarray):
        def __eq__(self, other):
            comparisons.append(other)
            return np.asarray(self) == other

    rng = np.random.default_rng(0)
    sources = np.array([f"s{i % 50}" for i in range(1000)], dtype=object).view(CountingArray)
    labels = torch.from_numpy(rng.integers(0, 2, 1000))
    logits = torch.randn(1000) + 2 * labels - 1
    split = Split("val", torch.zeros(1000, 3, 2, 2, dtype=torch.uint8), torch.arange(1000), labels, sources)
    snap = Snapshot(Path("x.pt"), ModelConfig(), {})
    report = report_predictions(snap, split, logits, torch.randn(1000, 4))
    assert len(comparisons) < 5 and len(report["per_source"]) == 50
    rows = np.flatnonzero(np.asarray(sources) == "s7")
    probs = torch.sigmoid(logits).numpy()
    assert report["per_source"]["s7"]["f1"] == pytest.approx(f1_score(labels.numpy()[rows], probs[rows] >= 0.5))
    assert sum(r["samples"] for r in report["per_source"].values()) == 1000


def test_eval_max_bad_fraction_is_a_flag(ocec, trained_run, tmp_path):
    write_synthetic(tmp_path / "d", 60, seed=0, style="a")
    table = pq.read_table(tmp_path / "d" / "dataset.parquet")
    blobs = table.column("image_bytes").to_pylist()
    blobs[0] = b"broken"
    table = table.set_column(table.schema.get_field_index("image_bytes"), "image_bytes", pa.array(blobs, pa.binary()))
    pq.write_table(table, tmp_path / "bad.parquet")
    args = ["eval", "--checkpoint", trained_run, "--data_root", tmp_path / "bad.parquet", "--split", "all"]
    refused = ocec(*args)
    assert refused.code == 2 and "--max_bad_fraction" in refused.err
    accepted = ocec(*args, "--max_bad_fraction", 0.05)
    assert accepted.code == 0, accepted.err
    assert ocec(*args, "--max_bad_fraction", 2).code == 2


def test_threshold_moves_the_decision(ocec, trained_run, data_a, tmp_path):
    args = ["eval", "--checkpoint", trained_run, "--data_root", data_a, "--split", "all"]
    reports = {}
    for threshold in (0.05, 0.5, 0.95):
        out = tmp_path / f"{threshold}.json"
        assert ocec(*args, "--threshold", threshold, "--json", out).code == 0
        reports[threshold] = json.loads(out.read_text())["overall"]
    predicted_open = {t: r["confusion_matrix"]["tp"] + r["confusion_matrix"]["fp"] for t, r in reports.items()}
    assert predicted_open[0.05] > predicted_open[0.5] > predicted_open[0.95]
    assert reports[0.05]["threshold"] == 0.05 and reports[0.05]["roc_auc"] == reports[0.95]["roc_auc"]
    write_synthetic(tmp_path / "d", 20, seed=9, style="a", embed_bytes=False)
    labels = {}
    for threshold in (0.0, 0.5, 0.9):
        out = tmp_path / f"p{threshold}.csv"
        flags = ["--inputs", tmp_path / "d" / "images", "--output", out, "--threshold", threshold]
        assert ocec("predict", "--checkpoint", trained_run, *flags).code == 0
        rows = list(csv.DictReader(out.open()))
        assert all((float(r["prob_open"]) >= threshold) == (r["predicted"] == "open") for r in rows)
        labels[threshold] = sum(r["predicted"] == "open" for r in rows)
    assert labels[0.0] == 20 and labels[0.0] >= labels[0.5] >= labels[0.9]
    refused = ocec("predict", "--checkpoint", trained_run, "--inputs", tmp_path / "d", "--threshold", 1.5)
    assert refused.code == 2 and "a probability is in [0, 1]" in refused.err


def test_predict_streams_a_folder_batch_by_batch(ocec, trained_run, tmp_path, monkeypatch):
    """Decoding and predicting alternate batch by batch: a folder of any size is never decoded at once."""
    import ocec.tools.predict as evaluate_mod
    from ocec.models.model import OcecModel

    write_synthetic(tmp_path / "d", 20, seed=9, style="a", embed_bytes=False)
    events = []
    decode, embed = evaluate_mod.decode_image_bytes, OcecModel.embed
    monkeypatch.setattr(evaluate_mod, "decode_image_bytes", lambda *a: events.append("decode") or decode(*a))
    monkeypatch.setattr(OcecModel, "embed", lambda self, x: events.append(f"forward {len(x)}") or embed(self, x))
    result = ocec("predict", "--checkpoint", trained_run, "--inputs", tmp_path / "d" / "images", "--batch_size", 8)
    assert result.code == 0, result.err
    forwards = [e for e in events if e.startswith("forward")]
    assert forwards == ["forward 8", "forward 8", "forward 4"]
    assert events.index("forward 8") == 8 and events[9] == "decode"  # the 2nd batch is decoded after the 1st ran


def test_predict_writes_one_schema_for_image_files_and_for_parquet(ocec, trained_run, tmp_path):
    """Same columns, same quoting; the truth is in `label` (only when the data has one), the model's answer in
    `predicted`. On the same images both inputs give the same probabilities."""
    write_synthetic(tmp_path / "d", 12, seed=9, style="a", embed_bytes=False)
    common = ["--checkpoint", trained_run, "--device", "cpu"]
    assert ocec("predict", *common, "--inputs", tmp_path / "d" / "images", "--output", tmp_path / "i.csv").code == 0
    assert ocec("predict", *common, "--data_root", tmp_path / "d", "--output", tmp_path / "p.csv").code == 0
    printed = ocec("predict", *common, "--inputs", tmp_path / "d" / "images").out
    files, rows = (list(csv.DictReader((tmp_path / f).open())) for f in ("i.csv", "p.csv"))
    assert list(files[0]) == ["path", "row", "source", "prob_open", "predicted"]
    assert list(rows[0]) == ["path", "row", "source", "prob_open", "predicted", "label"]
    header = [(tmp_path / f).read_text().splitlines()[0] for f in ("i.csv", "p.csv")]
    assert header[1].startswith(header[0]) and header[0] in printed.splitlines()
    table = pq.read_table(tmp_path / "d" / "dataset.parquet")
    truth = ["open" if c else "closed" for c in table.column("class_id").to_pylist()]
    assert [r["label"] for r in sorted(rows, key=lambda r: int(r["row"]))] == truth
    by_image = {str(Path(r["path"]).relative_to(tmp_path / "d")): r["prob_open"] for r in files}
    image_of_row = table.column("image_path").to_pylist()
    assert {image_of_row[int(r["row"])]: r["prob_open"] for r in rows} == by_image
