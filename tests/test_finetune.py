"""Fine-tuning: --pretrain selection and inheritance, architecture checks, margin re-initialisation,
freezing and staged unfreezing, per-group LRs, mixing, extra validation, and that it pays off."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import FIXTURES, history, only_run
from ocec.checkpoint import choose_best, load_pretrained, read_snapshot
from ocec.config import ModelConfig
from ocec.model import build_model
from ocec.synth import write_synthetic

# TINY minus the architecture flags: a fine-tune inherits them from the checkpoint.
TRAIN_ONLY = "--batch_size 32 --num_workers 0 --warmup_epochs 0 --device cpu".split()


@pytest.fixture
def finetune(train, data_a, trained_run, tmp_path):
    """A tiny CPU fine-tune of `trained_run` on dataset A into tmp_path: finetune(epochs, *extra_flags)."""

    def run(epochs, *extra):
        return train(data_a, tmp_path, epochs, *TRAIN_ONLY, "--pretrain", trained_run, *extra)

    return run


def _chosen(run_dir):
    return json.loads((run_dir / "config.json").read_text())["pretrain"]["path"]


@pytest.fixture
def candidates(trained_run, tmp_path):
    """Three checkpoints whose recorded F1 is 0.5, 0.9 and 0.7; the 0.7 one is the newest file."""
    folder = tmp_path / "cands"
    folder.mkdir()
    base = torch.load(trained_run / "ocec_epoch_0002.pt", weights_only=True)
    for epoch, f1, name in [
        (1, 0.5, "ocec_best_epoch0001_f1_0.5000.pt"),
        (2, 0.9, "ocec_best_epoch0002_f1_0.9000.pt"),
        (3, 0.7, "ocec_epoch_0003.pt"),
    ]:
        torch.save({**base, "epoch": epoch, "score": f1, "metrics": {"val": {"f1": f1}}}, folder / name)
    return folder


@pytest.mark.parametrize("form", ["folder", "files", "glob"])
def test_pretrain_picks_the_highest_f1_candidate(ocec, data_a, candidates, tmp_path, form):
    args = {"folder": [candidates], "files": sorted(candidates.iterdir()), "glob": [candidates / "ocec_*.pt"]}[form]
    result = ocec(
        "train", "--data_root", data_a, "--output_dir", tmp_path / "r", "--epochs", 1, *TRAIN_ONLY, "--pretrain", *args
    )
    assert result.code == 0, result.err
    assert _chosen(only_run(tmp_path / "r")).endswith("ocec_best_epoch0002_f1_0.9000.pt")
    assert "highest F1 0.9000 among 3 candidates" in result.out


def test_pretrain_starts_a_fresh_run_with_the_checkpoint_architecture(finetune, tmp_path):
    result = finetune(1)
    assert result.code == 0, result.err
    run = only_run(tmp_path)
    model = json.loads((run / "config.json").read_text())["model"]
    assert (model["base_channels"], model["num_blocks"], model["image_size"]) == (8, 2, [16, 32])
    assert [r["epoch"] for r in history(run)] == [1]  # epoch counter starts fresh
    assert "pretrained tensors loaded: backbone" in result.out and "re-initialised: none" in result.out


def test_structural_mismatches_are_listed_and_stop_before_training(ocec, data_a, trained_run, tmp_path):
    result = ocec(
        "train",
        "--data_root",
        data_a,
        "--output_dir",
        tmp_path,
        "--pretrain",
        trained_run,
        "--base_channels",
        16,
        "--num_blocks",
        2,
        "--image_size",
        "24x48",
        "--arch_variant",
        "convnext",
        "--margin_m",
        0.5,
    )
    assert result.code == 2
    err = result.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for expected in (
        "base_channels: checkpoint=8, given=16",
        "image_size: checkpoint=16x32, given=24x48",
        "arch_variant: checkpoint=baseline, given=convnext",
        "margin_m: checkpoint=0.35, given=0.5",
    ):
        assert expected in err
    assert "num_blocks" not in err  # typed, but equal
    assert not list(tmp_path.glob("v*"))


def test_margin_method_change_reinitialises_only_the_margin_head(bce_run, trained_run):
    snap = read_snapshot(bce_run / "ocec_epoch_0002.pt")
    model = build_model(ModelConfig.from_dict({**snap.model_config.to_dict(), "margin_method": "cosface"}))
    report = load_pretrained(model, snap)
    state = model.state_dict()
    for name, tensor in snap.state.items():
        if name.startswith("margin_head"):
            assert name not in state
        else:
            assert torch.equal(state[name], tensor), name
    assert state["margin_head.weight"].shape == (2, model.head.out_features)
    assert report.reinitialised == {"margin_head": 1} and report.ignored == [
        "margin_head.fc.bias",
        "margin_head.fc.weight",
    ]
    assert "margin method none -> cosface" in report.line() and "old classifier's direction" in report.line()
    # cosface -> arcface: same shapes, yet the margin head is re-initialised (and only it)
    cos = read_snapshot(trained_run / "ocec_epoch_0002.pt")
    arc = build_model(ModelConfig.from_dict({**cos.model_config.to_dict(), "margin_method": "arcface"}))
    load_pretrained(arc, cos)
    assert not torch.equal(arc.state_dict()["margin_head.weight"], cos.state["margin_head.weight"])
    assert all(torch.equal(arc.state_dict()[k], v) for k, v in cos.state.items() if not k.startswith("margin_head"))


def test_reinit_head_reinitialises_head_and_margin_head(trained_run):
    snap = read_snapshot(trained_run / "ocec_epoch_0002.pt")
    torch.manual_seed(123)
    model = build_model(snap.model_config)
    report = load_pretrained(model, snap, reinit_head=True)
    state = model.state_dict()
    assert torch.equal(state["backbone.stem.0.weight"], snap.state["backbone.stem.0.weight"])
    assert not torch.equal(state["margin_head.weight"], snap.state["margin_head.weight"])
    assert set(report.reinitialised) == {"head", "margin_head"}


def test_freeze_backbone_keeps_weights_and_bn_statistics_while_the_head_learns(
    ocec, train, data_a, trained_run, tmp_path
):
    result = train(
        data_a, tmp_path, 1, *TRAIN_ONLY, "--pretrain", trained_run / "ocec_epoch_0002.pt", "--freeze_backbone"
    )
    assert result.code == 0, result.err
    assert "0/3 backbone units trainable" in result.out
    before = torch.load(trained_run / "ocec_epoch_0002.pt", weights_only=True)["model_state"]
    after = torch.load(only_run(tmp_path) / "ocec_epoch_0001.pt", weights_only=True)["model_state"]
    for name in before:
        if name.startswith("backbone"):
            assert torch.equal(before[name], after[name]), name  # weights and running statistics
    assert not torch.equal(before["head.norm.weight"], after["head.norm.weight"])
    assert not torch.equal(before["head.norm.running_mean"], after["head.norm.running_mean"])
    assert not torch.equal(before["margin_head.weight"], after["margin_head.weight"])


def test_unfreezing_at_epoch_e_changes_exactly_the_chosen_units(ocec, finetune, data_a, trained_run, tmp_path):
    result = finetune(2, "--stages", "1:0,2:0.3:5e-4", "--stage_warmup_epochs", 0.5)
    assert result.code == 0, result.err
    assert "stage from epoch 2: 1/3 backbone units trainable (features.1)" in result.out
    run = only_run(tmp_path)
    e1 = torch.load(run / "ocec_epoch_0001.pt", weights_only=True)["model_state"]
    e2 = torch.load(run / "ocec_epoch_0002.pt", weights_only=True)["model_state"]
    for name in e1:
        if name.startswith("backbone"):
            assert torch.equal(e1[name], e2[name]) != name.startswith("backbone.features.1."), name
    rows = history(run)
    assert rows[0]["trainable_backbone_units"] == 0 and rows[1]["trainable_backbone_units"] == 1
    assert rows[1]["lr_backbone"] == pytest.approx(5e-4)  # stage LR reached after its re-warm


def test_unfreeze_flags_schedule_the_backbone(ocec, finetune, data_a, trained_run, tmp_path):
    result = finetune(
        2, "--freeze_backbone", "--unfreeze_backbone_epoch", 2, "--unfreeze_ratio", 1.0, "--stage2_lr", 2e-4
    )
    assert result.code == 0, result.err
    assert [r["trainable_backbone_units"] for r in history(only_run(tmp_path))] == [0, 3]
    assert "3/3 backbone units trainable (stem, features.0, features.1), backbone lr 2.00e-04" in result.out


def test_per_group_learning_rates_after_warmup(ocec, finetune, data_a, trained_run, tmp_path):
    result = finetune(2, "--warmup_epochs", 2, "--backbone_lr", 1e-4, "--head_lr", 5e-4, "--margin_lr", 1e-3)
    assert result.code == 0, result.err
    rows = history(only_run(tmp_path))
    assert rows[0]["lr_head"] < 5e-4  # still warming up during epoch 1
    assert (rows[1]["lr_backbone"], rows[1]["lr_head"], rows[1]["lr_margin_head"]) == pytest.approx((1e-4, 5e-4, 1e-3))
    assert "lr backbone 1.00e-04 head 5.00e-04 margin_head 1.00e-03" in result.out


def test_mixing_and_extra_validation_are_logged(ocec, train, data_a, data_b, trained_run, tmp_path):
    result = train(
        data_b,
        tmp_path,
        1,
        *TRAIN_ONLY,
        "--pretrain",
        trained_run,
        "--mix_data_root",
        data_a,
        "--mix_ratio",
        0.3,
        "--extra_val_root",
        data_a,
    )
    assert result.code == 0, result.err
    row = history(only_run(tmp_path))[0]
    assert 0.0 <= row["extra_val_f1"] <= 1.0 and "extra_val_loss" in row
    assert "extra_val f1" in result.out
    # selection uses B's validation split only
    summary = json.loads((only_run(tmp_path) / "summary.json").read_text())
    assert summary["best_f1"] == pytest.approx(row["val_f1"])


def test_upstream_checkpoint_fine_tunes_with_a_new_cosface_head(ocec, train, tmp_path):
    write_synthetic(tmp_path / "b", 120, seed=0, style="b")
    result = train(
        tmp_path / "b",
        tmp_path / "r",
        1,
        *TRAIN_ONLY,
        "--pretrain",
        FIXTURES / "upstream_baseline.pt",
        "--margin_method",
        "cosface",
    )
    assert result.code == 0, result.err
    assert "backbone 54, head 5, margin_head 0" in result.out and "margin method none -> cosface" in result.out
    model = json.loads((only_run(tmp_path / "r") / "config.json").read_text())["model"]
    assert model["base_channels"] == 32 and model["image_size"] == [32, 64] and model["margin_method"] == "cosface"


def test_upstream_checkpoint_keeps_its_one_logit_classifier_by_default(ocec, train, tmp_path):
    write_synthetic(tmp_path / "b", 80, seed=0, style="b")
    result = train(tmp_path / "b", tmp_path / "r", 1, *TRAIN_ONLY, "--pretrain", FIXTURES / "upstream_baseline.pt")
    assert result.code == 0, result.err
    assert "backbone 54, head 5, margin_head 2; re-initialised: none; ignored: 0" in result.out


def test_fine_tuning_beats_training_from_scratch_on_shifted_data(ocec, train, tmp_path):
    """Style b is a shifted domain. With the same small budget (4 epochs on 500 images), starting
    from a model trained on style a must beat starting from scratch by a clear margin."""
    write_synthetic(tmp_path / "a", 1200, seed=11, style="a")
    write_synthetic(tmp_path / "b", 500, seed=20, style="b")
    common = "--image_size 24x48 --base_channels 8 --num_blocks 4 --batch_size 32 --num_workers 0 --device cpu"
    common = [*common.split(), "--warmup_epochs", 0.5, "--seed", 42]
    assert train(tmp_path / "a", tmp_path / "A", 4, "--lr", 3e-3, *common).code == 0
    assert train(tmp_path / "b", tmp_path / "S", 4, "--lr", 3e-3, *common).code == 0
    assert (
        train(tmp_path / "b", tmp_path / "F", 4, "--lr", 1.5e-3, "--pretrain", only_run(tmp_path / "A"), *common).code
        == 0
    )
    best = lambda d: json.loads((only_run(d) / "summary.json").read_text())["best_f1"]
    scratch, finetuned = best(tmp_path / "S"), best(tmp_path / "F")
    assert finetuned >= scratch + 0.1, (scratch, finetuned)
    assert finetuned > 0.75


def test_resume_of_a_fine_tune_keeps_its_pretrain_record(ocec, finetune, data_a, trained_run, tmp_path):
    assert finetune(1).code == 0
    run = only_run(tmp_path)
    result = ocec("train", "--resume", run, "--epochs", 2)
    assert result.code == 0, result.err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["pretrain"]["path"].startswith(str(trained_run)) and summary["epochs_completed"] == 2


def test_safetensors_round_trip_through_pretrain(ocec, data_a, trained_run, tmp_path):
    pytest.importorskip("safetensors", reason="the safetensors extra is not installed")
    out = tmp_path / "model.safetensors"
    result = ocec("export", "--checkpoint", trained_run, "--output", out, "--format", "safetensors")
    assert result.code == 0, result.err
    snap = read_snapshot(out)
    best, _ = choose_best([trained_run])
    assert snap.model_config == best.model_config and snap.score == pytest.approx(best.score)
    assert snap.state.keys() == best.state.keys()
    assert all(torch.equal(snap.state[k], best.state[k]) for k in best.state)
    result = ocec(
        "train", "--data_root", data_a, "--output_dir", tmp_path / "r", "--epochs", 1, *TRAIN_ONLY, "--pretrain", out
    )
    assert result.code == 0, result.err
    assert "re-initialised: none" in result.out


def test_copied_run_folder_is_accepted_as_pretrain(ocec, data_a, trained_run, tmp_path):
    copy = tmp_path / "copied"
    shutil.copytree(trained_run, copy)
    result = ocec(
        "train", "--data_root", data_a, "--output_dir", tmp_path / "r", "--epochs", 1, *TRAIN_ONLY, "--pretrain", copy
    )
    assert result.code == 0 and "among" in result.out


def test_shape_mismatches_while_loading_are_listed(ocec, data_a, trained_run, tmp_path):
    ckpt = torch.load(trained_run / "ocec_epoch_0003.pt", weights_only=True)
    state = dict(ckpt["model_state"])
    state["backbone.stem.0.weight"] = torch.zeros(16, 3, 3, 3)  # the config still says 8 channels
    del state["head.norm.bias"]
    torch.save({**ckpt, "model_state": state}, tmp_path / "odd.pt")
    result = ocec(
        "train", "--data_root", data_a, "--output_dir", tmp_path / "r", *TRAIN_ONLY, "--pretrain", tmp_path / "odd.pt"
    )
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "backbone.stem.0.weight: checkpoint=(16, 3, 3, 3), given=(8, 3, 3, 3)" in result.err
    assert "head.norm.bias: checkpoint=absent, given=(8,)" in result.err
