"""Weights to start from: choosing among candidates, loading with a report, never a partial load."""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURES, checkpoint

from ocec.core.config import ModelConfig
from ocec.core.errors import UserError
from ocec.finetune.pretrained import choose_best, load_for_inference, load_pretrained, read_snapshot
from ocec.models.model import build_model


@pytest.fixture
def candidates(trained_run, tmp_path):
    """Three checkpoints whose recorded F1 is 0.5, 0.9 and 0.7; the 0.7 one is the newest file."""
    folder = tmp_path / "cands"
    folder.mkdir()
    base = checkpoint(trained_run / "ocec_epoch_0002.pt")
    for epoch, f1, name in [
        (1, 0.5, "ocec_best_epoch0001_f1_0.5000.pt"),
        (2, 0.9, "ocec_best_epoch0002_f1_0.9000.pt"),
        (3, 0.7, "ocec_epoch_0003.pt"),
    ]:
        torch.save({**base, "epoch": epoch, "score": f1, "metrics": {"val": {"f1": f1}}}, folder / name)
    return folder


@pytest.mark.parametrize("form", ["folder", "files", "glob"])
def test_the_highest_f1_candidate_wins(candidates, form):
    paths = {"folder": [candidates], "files": sorted(candidates.iterdir()), "glob": [candidates / "ocec_*.pt"]}[form]
    snap, why = choose_best([str(p) for p in paths])
    assert snap.path.name == "ocec_best_epoch0002_f1_0.9000.pt" and snap.score == 0.9
    assert "highest F1 0.9000 among 3 candidates" in why


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
    assert report.to_dict()["path"] == str(snap.path)
    # cosface -> arcface: same shapes, yet the margin head is re-initialised (and only it)
    cos = read_snapshot(trained_run / "ocec_epoch_0002.pt")
    arc = build_model(ModelConfig.from_dict({**cos.model_config.to_dict(), "margin_method": "arcface"}))
    load_pretrained(arc, cos)
    assert not torch.equal(arc.state_dict()["margin_head.weight"], cos.state["margin_head.weight"])
    assert all(torch.equal(arc.state_dict()[k], v) for k, v in cos.state.items() if not k.startswith("margin_head"))


def test_margin_init_random_and_from_linear(bce_run):
    snap = read_snapshot(bce_run / "ocec_epoch_0002.pt")
    cfg = ModelConfig.from_dict({**snap.model_config.to_dict(), "margin_method": "cosface"})
    torch.manual_seed(0)
    random = build_model(cfg)
    report = load_pretrained(random, snap, margin_init="random")
    direction = torch.nn.functional.normalize(snap.state["margin_head.fc.weight"].reshape(-1), dim=0)
    linear = build_model(cfg)
    load_pretrained(linear, snap, margin_init="from_linear")
    assert torch.allclose(linear.margin_head.weight[1], direction) and torch.allclose(
        linear.margin_head.weight[0], -direction
    )
    assert not torch.allclose(random.margin_head.weight[1], direction)
    assert "old classifier's direction" not in report.line()


def test_margin_init_is_refused_when_the_margin_head_is_kept(trained_run, bce_run):
    snap = read_snapshot(trained_run / "ocec_epoch_0002.pt")
    with pytest.raises(UserError, match="--margin_init from_linear: the margin head is kept"):
        load_pretrained(build_model(snap.model_config), snap, margin_init="from_linear")
    cosface = read_snapshot(trained_run / "ocec_epoch_0002.pt")
    arc = build_model(ModelConfig.from_dict({**cosface.model_config.to_dict(), "margin_method": "arcface"}))
    with pytest.raises(UserError, match="has no linear classifier to start from"):
        load_pretrained(arc, cosface, margin_init="from_linear")


def test_reinit_head_reinitialises_head_and_margin_head(trained_run):
    snap = read_snapshot(trained_run / "ocec_epoch_0002.pt")
    torch.manual_seed(123)
    model = build_model(snap.model_config)
    report = load_pretrained(model, snap, reinit_head=True)
    state = model.state_dict()
    assert torch.equal(state["backbone.stem.0.weight"], snap.state["backbone.stem.0.weight"])
    assert not torch.equal(state["margin_head.weight"], snap.state["margin_head.weight"])
    assert not torch.equal(state["head.norm.weight"], snap.state["head.norm.weight"])
    assert set(report.reinitialised) == {"head", "margin_head"}


def test_inference_refuses_weights_that_do_not_match_their_config(trained_run, tmp_path):
    ckpt = checkpoint(trained_run / "ocec_epoch_0003.pt")
    state = dict(ckpt["model_state"])
    state["backbone.stem.0.weight"] = torch.zeros(16, 3, 3, 3)
    torch.save({**ckpt, "model_state": state}, tmp_path / "odd.pt")
    with pytest.raises(UserError, match=r"backbone.stem.0.weight: checkpoint=\(16, 3, 3, 3\), given=\(8, 3, 3, 3\)"):
        load_for_inference([str(tmp_path / "odd.pt")], torch.device("cpu"))


def test_upstream_checkpoint_reads_as_a_one_logit_baseline():
    snap = read_snapshot(FIXTURES / "upstream_baseline.pt")
    assert snap.origin == "upstream" and snap.model_config.margin_method == "none"
    assert snap.score == pytest.approx(0.8759, abs=1e-4)
