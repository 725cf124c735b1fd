"""Shipping a model: ONNX (logits checked against PyTorch on eye images) and safetensors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import checkpoint

from ocec.finetune.pretrained import choose_best, load_for_inference


def test_onnx_export_matches_pytorch(ocec, trained_run, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installable on this platform")
    out = tmp_path / "model.onnx"
    result = ocec("exportonnx", "--checkpoint", trained_run, "--output", out)
    assert result.code == 0, result.err
    assert "Conv+BatchNorm folded" in result.out and "max |logit difference|" in result.out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["prob_open", "logit", "is_open"]
    snap, _ = choose_best([str(trained_run)])
    model, _, _ = load_for_inference([str(trained_run)], torch.device("cpu"))
    for n in (1, 7):  # dynamic batch
        x = torch.rand(n, 3, *snap.model_config.image_size, generator=torch.Generator().manual_seed(n))
        onnx_prob, onnx_logit, is_open = session.run(None, {"images": x.numpy()})
        assert onnx_prob.shape == (n,) and onnx_logit.shape == (n,)
        assert np.array_equal(is_open, onnx_prob >= 0.5)
        with torch.no_grad():
            assert np.abs(onnx_logit - model(x).numpy()).max() < 1e-4
        assert np.abs(onnx_prob - model.predict_proba(x).numpy()).max() < 1e-4
    assert not list(tmp_path.glob(".tmp-*"))


def test_onnx_self_check_catches_a_broken_graph(ocec, bce_run, tmp_path, monkeypatch):
    """A graph whose logits are all 0.3 off must fail the check. A confident BCE model's probabilities
    saturate on uniform noise, so a check of probabilities on noise passed this (max diff ~2e-5);
    the check compares logits on eye images."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installable on this platform")
    import ocec.tools.export as export_mod

    real = export_mod.fold_batchnorm

    def broken(model):
        folded, pairs = real(model)
        with torch.no_grad():
            folded.margin_head.fc.bias.add_(0.3)
        return folded, pairs

    monkeypatch.setattr(export_mod, "fold_batchnorm", broken)
    result = ocec("export", "--checkpoint", bce_run, "--output", tmp_path / "m.onnx")
    assert result.code == 1 and "differ from PyTorch beyond the tolerance" in result.err
    assert "on 16 eye images" in result.out
    monkeypatch.setattr(export_mod, "fold_batchnorm", real)
    assert ocec("export", "--checkpoint", bce_run, "--output", tmp_path / "ok.onnx").code == 0


def test_onnx_check_images_look_like_eyes():
    from ocec.tools.export import check_images

    images = check_images((32, 64))
    assert images.shape == (16, 3, 32, 64) and 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert float(images.std()) > 0.05  # structured images, not a constant


def test_export_without_the_onnx_extra_says_what_to_install(ocec, trained_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    result = ocec("export", "--checkpoint", trained_run, "--output", tmp_path / "m.onnx")
    assert result.code == 2 and "pip install 'ocec[onnx]'" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "m.onnx").exists()


def test_export_refuses_weights_that_do_not_match_their_config(ocec, trained_run, tmp_path):
    ckpt = checkpoint(trained_run / "ocec_epoch_0003.pt")
    state = {**ckpt["model_state"], "backbone.stem.0.weight": torch.zeros(16, 3, 3, 3)}
    torch.save({**ckpt, "model_state": state}, tmp_path / "odd.pt")
    for command in (
        ["export", "--checkpoint", tmp_path / "odd.pt", "--output", tmp_path / "m.onnx"],
        ["predict", "--checkpoint", tmp_path / "odd.pt", "--inputs", tmp_path],
    ):
        result = ocec(*command)
        assert result.code == 2 and "do not match the recorded architecture" in result.err, result.err
        assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1


def test_opset_is_written_into_the_graph(ocec, trained_run, tmp_path):
    onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
    for opset in (13, 17):
        out = tmp_path / f"m{opset}.onnx"
        result = ocec("export", "--checkpoint", trained_run, "--output", out, "--opset", opset)
        assert result.code == 0, result.err
        model = onnx.load(str(out))
        assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {opset}
