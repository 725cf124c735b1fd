"""Checkpoint files: names, keeping the best/last N, plain-data payloads, safe loading, the best record."""

from __future__ import annotations

import pytest
import torch
from conftest import checkpoint

from ocec.core.errors import UserError
from ocec.engine.checkpoint import BEST_RE, Best, CheckpointKeeper, load_file, load_resumable, save_checkpoint


def test_checkpoint_keeper_names_and_prunes(tmp_path):
    keeper = CheckpointKeeper(tmp_path, keep_last=2, keep_best=2)
    for epoch, f1 in [(1, 0.5), (2, 0.61), (3, 0.7), (4, 0.65)]:
        saved = keeper.save_epoch(epoch, {"epoch": epoch})
        if epoch != 4:
            keeper.copy_to_best(saved, f"ocec_best_epoch{epoch:04d}_f1_{f1:.4f}.pt")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "ocec_best_epoch0002_f1_0.6100.pt",
        "ocec_best_epoch0003_f1_0.7000.pt",
        "ocec_epoch_0003.pt",
        "ocec_epoch_0004.pt",
    ]
    assert not list(tmp_path.glob(".tmp-*"))
    assert checkpoint(tmp_path / "ocec_best_epoch0003_f1_0.7000.pt") == {"epoch": 3}  # a byte copy


def test_every_checkpoint_loads_weights_only_and_holds_plain_data(trained_run):
    files = sorted(trained_run.glob("*.pt"))
    assert len(files) >= 3
    for path in files:
        ckpt = checkpoint(path)
        for key in (
            "model_state",
            "model_config",
            "train_config",
            "optimizer_state",
            "schedule_state",
            "epoch",
            "metrics",
            "history",
            "best",
            "normalization",
        ):
            assert key in ckpt, (path.name, key)
        assert ckpt["model_config"]["image_size"] == [16, 32]
        assert ckpt["model_config"]["margin_method"] == "cosface"
    best = [p for p in files if BEST_RE.match(p.name)][-1]
    epoch = trained_run / f"ocec_epoch_{int(BEST_RE.match(best.name).group(1)):04d}.pt"
    assert best.read_bytes() == epoch.read_bytes()  # the best file is the epoch file, copied


def test_best_record_prefers_higher_f1_or_lower_loss():
    best = Best("val_f1")
    assert best.improved_by(0.5) and not best.improved_by(float("nan")) and not best.improved_by(None)
    best.score = 0.5
    assert best.improved_by(0.6) and not best.improved_by(0.5)
    loss = Best("val_loss", score=0.3)
    assert loss.improved_by(0.2) and not loss.improved_by(0.4)
    assert Best.from_dict({"f1": 0.7, "epoch": 2, "path": "x"}).score == 0.7  # older checkpoints


def test_while_every_f1_is_zero_the_best_threshold_f1_decides():
    best, kept = Best("val_f1"), []
    for epoch, (f1, at_best_threshold) in enumerate([(0.0, 0.6), (0.0, 0.7), (0.0, 0.65), (0.5, 0.8), (0.0, 0.9)]):
        if best.improved_by(f1, at_best_threshold):
            best = Best("val_f1", f1, f1, epoch, None, at_best_threshold)
            kept.append(epoch)
    assert kept == [0, 1, 3]  # an all-closed epoch never beats one with F1 > 0 at 0.5
    assert not best.by_tiebreak() and Best("val_f1", 0.0, 0.0, 1, None, 0.7).by_tiebreak()
    assert Best.from_dict(Best("val_f1", 0.0, 0.0, 1, "x", 0.7).to_dict()).tiebreak == 0.7  # kept across --resume


def test_load_file_refuses_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(UserError, match="--pretrain .*text.pt: not a PyTorch checkpoint"):
        load_file(tmp_path / "text.pt")
    save_checkpoint(tmp_path / "list.pt", [1, 2])
    with pytest.raises(UserError, match="holds a list, not a dict"):
        load_file(tmp_path / "list.pt", "--resume")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not an ocec training checkpoint"):
        load_resumable(tmp_path / "foreign.pt")
