"""Every model A the upstream trainer (PINTO0309/OCEC) can write: it imports with upstream's exact logits,
fine-tunes and exports for upstream's demo and OpenCV; ocec's own older checkpoints still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, TINY, TINY_TRAIN, history, only_run, torchrun

from ocec.core.config import ARCH_VARIANTS, HEAD_VARIANTS
from ocec.finetune.pretrained import read_snapshot
from ocec.models.model import build_model

UPSTREAM = sorted((FIXTURES / "upstream").glob("*.pt"))
OLD_OCEC = sorted(FIXTURES.glob("ocec_v1_*.pt"))  # written by ocec 0.x (checkpoint format 1), with its logits


def golden(path: Path) -> tuple[torch.Tensor, dict]:
    data = np.load(path.with_name(path.stem + "_golden.npz"))
    return torch.from_numpy(data["images_uint8"]).float() / 255.0, {k: data[k] for k in data.files}


def model_of(path: Path):
    snap = read_snapshot(path)
    model = build_model(snap.model_config).eval()
    model.load_state_dict(snap.state, strict=True)
    return model, snap


def test_the_fixtures_cover_every_upstream_architecture_and_head():
    configs = json.loads((FIXTURES / "upstream" / "variants.json").read_text())
    built = {(c["model_config"]["arch_variant"], c["model_config"]["head_variant"]) for c in configs.values()}
    assert {arch for arch, _ in built} == {"baseline", "inverted_se", "convnext"} and len(UPSTREAM) == 6


@pytest.mark.parametrize("path", UPSTREAM, ids=lambda p: p.stem)
def test_an_upstream_checkpoint_reproduces_upstreams_logits(path):
    model, snap = model_of(path)
    images, want = golden(path)
    with torch.no_grad():
        logits = model(images)
    assert np.abs(logits.numpy() - want["logits"]).max() < 1e-5
    assert (
        sum(p.numel() for p in model.parameters())
        == json.loads((FIXTURES / "upstream" / "variants.json").read_text())[path.stem.removeprefix("upstream_")][
            "params"
        ]
    )


@pytest.mark.parametrize("path", UPSTREAM, ids=lambda p: p.stem)
def test_an_upstream_model_a_fine_tunes_and_exports_for_onnxruntime_and_opencv(path, train, ocec, data_a, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    cv2 = pytest.importorskip("cv2")
    result = train(data_a, tmp_path / "run", 1, *TINY_TRAIN, "--pretrain", path)
    assert result.code == 0, result.err
    assert [r["epoch"] for r in history(only_run(tmp_path / "run"))] == [1]
    onnx = tmp_path / "a.onnx"  # model A itself, in upstream's interface: images [N,3,H,W] in [0,1] -> prob_open
    result = ocec("export", "--checkpoint", path, "--output", onnx)
    assert result.code == 0, result.err
    images, want = golden(path)
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "images" and session.get_outputs()[0].name == "prob_open"
    prob = session.run(None, {"images": images.numpy()})[0]  # the first output, as upstream's demo reads it
    assert np.abs(prob - want["prob_open"]).max() < 1e-4
    net = cv2.dnn.readNetFromONNX(str(onnx))
    net.setInput(images.numpy(), "images")
    assert np.abs(net.forward("prob_open").reshape(-1) - want["prob_open"]).max() < 1e-4
    assert "OpenCV" in result.out and "beyond the tolerance" not in result.out


@pytest.mark.parametrize("path", [p for p in UPSTREAM if "32x64" in p.name], ids=lambda p: p.stem)
def test_every_fine_tuning_technique_runs_on_every_upstream_architecture(path, train, data_a, trained_run, tmp_path):
    # input-side stages (surgical), layer-wise LR decay, L2-SP, EMA, BN adaptation and a teacher of another size
    flags = ["--recipe", "surgical", "--layer_decay", 0.8, "--l2sp", 0.01, "--ema_decay", 0.9]
    result = train(data_a, tmp_path, 2, *TINY_TRAIN, "--pretrain", path, *flags, "--teacher", trained_run)
    assert result.code == 0, result.err
    rows = history(only_run(tmp_path))
    assert rows[0]["trainable_backbone_units"] == 3  # half of stem + 4 blocks, from the input side
    assert "teacher: 1 model(s)" in result.out and "layer-wise" in result.out.lower()


@pytest.mark.parametrize(
    "arch,head", [(a, h) for a in ARCH_VARIANTS if not a.endswith("_v1") for h in HEAD_VARIANTS if h != "auto"]
)
def test_fresh_training_of_every_architecture_resumes_and_exports(arch, head, train, ocec, data_a, tmp_path):
    pytest.importorskip("onnxruntime")
    flags = ["--arch_variant", arch, "--head_variant", head, "--token_mixer_grid", "2x2", "--token_mixer_layers", 1]
    result = train(data_a, tmp_path, 1, *TINY, *flags)
    assert result.code == 0, result.err
    run = only_run(tmp_path)
    assert ocec("train", "--resume", run, "--epochs", 2).code == 0
    assert [r["epoch"] for r in history(run)] == [1, 2]
    result = ocec("export", "--checkpoint", run, "--output", tmp_path / "m.onnx")
    assert result.code == 0, result.err  # 1 when onnxruntime's logits differ beyond the tolerance
    assert "onnxruntime vs PyTorch" in result.out and "DNN vs PyTorch" in result.out, result.out
    assert "beyond the tolerance" not in result.out and "cannot run it" not in result.out


@pytest.mark.parametrize("path", OLD_OCEC, ids=lambda p: p.stem)
def test_checkpoints_ocec_wrote_before_still_load_resume_and_fine_tune(path, train, ocec, data_a, tmp_path):
    model, snap = model_of(path)
    assert snap.model_config.arch_variant.endswith("_v1")  # ocec 0.x's inverted_se / convnext, now named *_v1
    images, want = golden(path)
    with torch.no_grad():
        assert np.abs(model(images).numpy() - want["logits"]).max() < 1e-6  # the logits ocec 0.x computed
    run = tmp_path / "old" / "v1"
    run.mkdir(parents=True)
    shutil.copy(path, run / "ocec_epoch_0001.pt")
    result = ocec("train", "--resume", run, "--epochs", 2, "--data_root", data_a, "--device", "cpu")
    assert result.code == 0, result.err
    assert [r["epoch"] for r in history(run)] == [1, 2]  # the old run's epoch 1, and the resumed epoch 2
    assert train(data_a, tmp_path / "ft", 1, *TINY_TRAIN, "--pretrain", path).code == 0


def test_a_token_grid_that_does_not_divide_the_feature_map_is_refused_naming_grids_that_do(train, data_a, tmp_path):
    flags = ["--arch_variant", "convnext", "--head_variant", "transformer", "--token_mixer_grid", "2x3"]
    result = train(data_a, tmp_path, 1, *TINY, *flags)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert "--token_mixer_grid 2x3 does not divide the 4x8 feature map" in result.err and "2x4" in result.err
    assert not any(tmp_path.iterdir())  # refused before anything was read or written


def test_an_upstream_architecture_ocec_cannot_build_gets_one_line(train, data_a, tmp_path):
    raw = torch.load(UPSTREAM[0], weights_only=True)
    raw["model_config"]["arch_variant"] = "resnet"
    torch.save(raw, tmp_path / "resnet.pt")
    result = train(data_a, tmp_path / "out", 1, *TINY_TRAIN, "--pretrain", tmp_path / "resnet.pt")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1, result.err
    assert "arch_variant='resnet' cannot be imported (supported: baseline, inverted_se, convnext)" in result.err
    raw = torch.load(UPSTREAM[0], weights_only=True)
    raw["model_state"]["head.9.weight"] = torch.zeros(1)
    torch.save(raw, tmp_path / "extra.pt")
    result = train(data_a, tmp_path / "out", 1, *TINY_TRAIN, "--pretrain", tmp_path / "extra.pt")
    assert result.code == 2 and "upstream tensors with no mapping: head.9.weight" in result.err


def test_an_upstream_convnext_transformer_fine_tunes_and_resumes_under_torchrun(data_a, tmp_path):
    path = next(p for p in UPSTREAM if "transformer" in p.name)
    flags = ["--data_root", data_a, "--output_dir", tmp_path, *TINY_TRAIN, "--pretrain", path, "--epochs", 1]
    result = torchrun(*flags)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(tmp_path)
    log = (run / "train.log").read_text()
    assert "no BatchNorm adaptation: this model has no BatchNorm layers" in log
    resumed = torchrun("--resume", run, "--epochs", 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in history(run)] == [1, 2]
