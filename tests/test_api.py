"""The notebook API at the top of the package does what the commands do."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import ocec as api
from conftest import config, only_run, summary


def test_train_evaluate_predict_export_from_python(ocec, data_a, tmp_path):
    run = ocec_api_train(data_a, tmp_path / "runs")
    assert run == only_run(tmp_path / "runs") and config(run)["model"]["base_channels"] == 8
    with pytest.raises(TypeError, match="unknown training setting"):
        api.train(data_root=str(data_a), epoch=1)  # a misspelt setting is an error, as a misspelt flag
    report = api.evaluate(run, data_a, device="cpu", cache_dir=False)
    cli = tmp_path / "eval.json"
    assert ocec("eval", "--checkpoint", run, "--data_root", data_a, "--device", "cpu", "--json", cli).code == 0
    assert report["overall"] == json.loads(cli.read_text())["overall"]

    rows = api.predict(run, data_root=data_a, device="cpu")
    out = tmp_path / "p.csv"
    assert ocec("predict", "--checkpoint", run, "--data_root", data_a, "--device", "cpu", "--output", out).code == 0
    written = list(csv.DictReader(out.open()))
    assert [r["predicted"] for r in rows] == [r["predicted"] for r in written]
    assert [round(r["prob_open"], 6) for r in rows] == [float(r["prob_open"]) for r in written]

    exported = api.export(run, tmp_path / "m.safetensors", format="safetensors")
    assert exported["tensors"] > 0
    best = torch.load(summary(run)["best_checkpoint"], weights_only=True)["model_state"]
    from safetensors.torch import load_file

    assert all(torch.equal(load_file(tmp_path / "m.safetensors")[k], v) for k, v in best.items())


def ocec_api_train(data, out):
    return api.train(
        data_root=str(data),
        output_dir=str(out),
        epochs=1,
        image_size=(16, 32),
        base_channels=8,
        num_blocks=2,
        batch_size=32,
        num_workers=0,
        device="cpu",
    )


def test_api_mistakes_raise_user_error_with_the_commands_message(tmp_path):
    with pytest.raises(api.UserError, match="no such file"):
        api.evaluate(tmp_path / "missing.pt", tmp_path, device="cpu")
    with pytest.raises(api.UserError, match="not both"):
        api.predict(tmp_path / "missing.pt")
