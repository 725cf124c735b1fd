"""Judging and shipping a model: eval, compare, predict, export, plots, diagnostics, TensorBoard."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from conftest import FIXTURES, TINY, only_run
from ocec.checkpoint import choose_best
from ocec.data import load_dataset
from ocec.evaluate import load_for_inference
from ocec.metrics import best_threshold, binary_report, full_report
from ocec.plots import plot_runs
from ocec.synth import write_synthetic
from ocec.trainer import predict_split

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_equals_scikit_learn_on_known_predictions():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(labels * 0.35 + rng.random(200) * 0.65, 0, 1)
    rep = full_report(labels, probs)
    preds = (probs >= 0.5).astype(int)
    assert rep["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert rep["precision"] == pytest.approx(precision_score(labels, preds))
    assert rep["recall"] == pytest.approx(recall_score(labels, preds))
    assert rep["f1"] == pytest.approx(f1_score(labels, preds))
    assert rep["roc_auc"] == pytest.approx(roc_auc_score(labels, probs))
    assert rep["pr_auc"] == pytest.approx(average_precision_score(labels, probs))
    cm = rep["confusion_matrix"]
    assert cm["tp"] == int(((preds == 1) & (labels == 1)).sum()) and sum(cm.values()) == 200


def test_best_threshold_maximises_f1():
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    probs = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.9, 0.6])
    threshold, best = best_threshold(labels, probs)
    brute = max(f1_score(labels, (probs >= t).astype(int)) for t in probs)
    assert best == pytest.approx(brute) and best > f1_score(labels, (probs >= 0.5).astype(int))
    assert f1_score(labels, (probs >= threshold).astype(int)) == pytest.approx(best)


def test_single_class_metrics_are_undefined_not_errors():
    rep = binary_report(np.zeros(10), np.linspace(0, 1, 10))
    assert np.isnan(rep["roc_auc"]) and np.isnan(rep["recall"]) and rep["accuracy"] == 0.5


def test_eval_cli_matches_a_direct_computation_and_sources_add_up(ocec, trained_run, data_a, tmp_path):
    out = tmp_path / "eval.json"
    result = ocec(
        "eval", "--checkpoint", trained_run, "--data_root", data_a, "--split", "all", "--json", out, "--device", "cpu"
    )
    assert result.code == 0, result.err
    report = json.loads(out.read_text())
    assert "overall" in result.out and "confusion matrix" in result.out
    # recompute independently: the chosen checkpoint, every row of the dataset, scikit-learn
    model, snap = load_for_inference([str(trained_run)], torch.device("cpu"))
    data = load_dataset(data_a, snap.model_config.image_size)
    images = torch.cat([data.splits[s].images for s in ("train", "val", "test")])
    labels = torch.cat([data.splits[s].labels for s in ("train", "val", "test")]).numpy()
    probs = torch.sigmoid(predict_split(model, images, 64, torch.device("cpu"))[0]).numpy()
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
    assert len(rows) == 60 and set(rows[0]) == {"path", "prob_open", "label"}
    table = pq.read_table(tmp_path / "d" / "dataset.parquet")
    truth = dict(zip(table.column("image_path").to_pylist(), table.column("class_id").to_pylist()))
    labels = np.array([truth[str(Path(r["path"]).relative_to(tmp_path / "d"))] for r in rows])
    preds = np.array([r["label"] == "open" for r in rows])
    assert all((float(r["prob_open"]) >= 0.5) == (r["label"] == "open") for r in rows)
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
    assert len([ln for ln in result.out.splitlines() if ln.endswith((",open", ",closed"))]) == 4


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
    summary = json.loads((trained_run / "summary.json").read_text())
    assert rows[0]["best_val_f1"] == pytest.approx(summary["best_f1"]) and rows[0]["epochs"] == 3
    assert rows[0]["seconds"] == pytest.approx(summary["wall_seconds"]) and rows[0]["images_per_s"] > 0
    assert rows[2]["best_val_f1"] == pytest.approx(0.8759, abs=1e-4)  # the upstream checkpoint's recorded F1
    result = ocec(
        "compare", trained_run, bce_run, "--data_root", data_b, "--split", "all", "--device", "cpu", "--json", table
    )
    assert result.code == 0, result.err
    rows = json.loads(table.read_text())
    direct = ocec(
        "eval",
        "--checkpoint",
        summary["best_checkpoint"],
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


def test_plot_draws_the_expected_lines(tmp_path):
    hist = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_f1": 0.5 + e / 10, "lr_backbone": 1e-3}
        for e in range(1, 4)
    ]
    no_val = [{k: v for k, v in r.items() if not k.startswith("val")} for r in hist]
    path, lines = plot_runs([("a", hist), ("b", no_val)], tmp_path / "p.png")
    assert lines == 4 + 2
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 600 and image.size[1] > 200


def test_onnx_export_matches_pytorch(ocec, trained_run, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installable on this platform")
    out = tmp_path / "model.onnx"
    result = ocec("exportonnx", "--checkpoint", trained_run, "--output", out)
    assert result.code == 0, result.err
    assert "Conv+BatchNorm folded" in result.out and "max |difference|" in result.out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"] and [o.name for o in session.get_outputs()] == [
        "prob_open"
    ]
    snap, _ = choose_best([str(trained_run)])
    model, _ = load_for_inference([str(trained_run)], torch.device("cpu"))
    for n in (1, 7):  # dynamic batch
        x = torch.rand(n, 3, *snap.model_config.image_size, generator=torch.Generator().manual_seed(n))
        onnx_prob = session.run(None, {"images": x.numpy()})[0]
        assert onnx_prob.shape == (n,)
        assert np.abs(onnx_prob - model.predict_proba(x).numpy()).max() < 1e-4
    assert not list(tmp_path.glob(".tmp-*"))


def test_export_without_the_onnx_extra_says_what_to_install(ocec, trained_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    result = ocec("export", "--checkpoint", trained_run, "--output", tmp_path / "m.onnx")
    assert result.code == 2 and "pip install 'ocec[onnx]'" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "m.onnx").exists()


def test_diagnostics_and_tensorboard_outputs(ocec, train, data_a, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    result = train(data_a, tmp_path, 2, *TINY, "--save_diagnostics", "--tensorboard")
    assert result.code == 0, result.err
    run = only_run(tmp_path)
    pngs = sorted(p.name for p in (run / "diagnostics").iterdir())
    assert pngs == ["confusion_epoch0001.png", "confusion_epoch0002.png", "roc_epoch0001.png", "roc_epoch0002.png"]
    assert all((run / "diagnostics" / p).read_bytes()[:8] == PNG_MAGIC for p in pngs)
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and "tensorboard --logdir" in result.out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("val/f1", "train/loss", "lr/backbone", "val/fisher"):
        assert tag in tags
    assert [e.step for e in acc.Scalars("val/f1")] == [1, 2]
