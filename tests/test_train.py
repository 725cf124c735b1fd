"""`python -m ocec train` end to end: outputs, checkpoints, resume, history, user errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import TINY, history, only_run, run_subprocess
from ocec.checkpoint import BEST_RE, EPOCH_RE, CheckpointKeeper, best_name
from ocec.trainer import epoch_order, steps_per_epoch


def test_two_epochs_write_the_run_files_and_a_consistent_best(ocec, data_a, tmp_path):
    result = ocec("train", "--data_root", data_a, "--output_dir", tmp_path, "--epochs", 2, *TINY)
    assert result.code == 0, result.err
    run = only_run(tmp_path)
    assert run.name == "v1" and f"run folder: {run}" in result.out
    for name in (
        "config.json",
        "train.log",
        "history.json",
        "history.csv",
        "summary.json",
        "ocec_epoch_0001.pt",
        "ocec_epoch_0002.pt",
    ):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    best = [p for p in run.iterdir() if BEST_RE.match(p.name)]
    assert best, "no best checkpoint"
    newest_best = max(best, key=lambda p: int(BEST_RE.match(p.name).group(1)))
    assert newest_best.name == best_name(summary["best_epoch"], summary["best_f1"])
    assert f"{summary['best_f1']:.4f}" in newest_best.name and summary["best_checkpoint"] == str(newest_best)
    rows = json.loads((run / "history.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in (
        "train_loss",
        "train_f1",
        "val_loss",
        "val_accuracy",
        "val_precision",
        "val_recall",
        "val_f1",
        "val_roc_auc",
        "val_fisher",
        "lr_backbone",
        "lr_head",
        "lr_margin_head",
        "seconds",
        "wall_seconds",
        "images_per_s",
    ):
        assert key in rows[0], key
    assert max(r["val_f1"] for r in rows) == pytest.approx(summary["best_f1"])
    csv_header = (run / "history.csv").read_text().splitlines()[0].split(",")
    assert "val_fisher" in csv_header and len((run / "history.csv").read_text().splitlines()) == 3
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["image_size"] == [16, 32] and config["train"]["epochs"] == 2
    assert "epoch 2/2" in (run / "train.log").read_text()
    # a second run goes to v2, never overwriting v1
    assert ocec("train", "--data_root", data_a, "--output_dir", tmp_path, "--epochs", 1, *TINY).code == 0
    assert (tmp_path / "v2" / "ocec_epoch_0001.pt").is_file()


def test_every_checkpoint_loads_weights_only_and_holds_plain_data(trained_run):
    files = sorted(trained_run.glob("*.pt"))
    assert len(files) >= 3
    for path in files:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        for key in (
            "model_state",
            "model_config",
            "train_config",
            "optimizer_state",
            "schedule_state",
            "epoch",
            "metrics",
            "history",
            "normalization",
        ):
            assert key in ckpt, (path.name, key)
        assert ckpt["model_config"]["image_size"] == [16, 32]
        assert ckpt["model_config"]["margin_method"] == "cosface"


def test_checkpoint_keeper_names_and_prunes(tmp_path):
    keeper = CheckpointKeeper(tmp_path, keep_last=2, keep_best=2)
    for epoch, f1 in [(1, 0.5), (2, 0.61), (3, 0.7), (4, 0.65)]:
        keeper.save_epoch(epoch, {"epoch": epoch})
        if epoch != 4:
            keeper.save_best(epoch, f1, {"epoch": epoch})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "ocec_best_epoch0002_f1_0.6100.pt",
        "ocec_best_epoch0003_f1_0.7000.pt",
        "ocec_epoch_0003.pt",
        "ocec_epoch_0004.pt",
    ]
    assert not list(tmp_path.glob(".tmp-*"))


def test_keep_last_and_keep_best_flags_prune_a_real_run(ocec, train, data_a, tmp_path):
    assert train(data_a, tmp_path, 4, "--keep_last", 2, "--keep_best", 1, *TINY).code == 0
    run = only_run(tmp_path)
    epochs = sorted(int(EPOCH_RE.match(p.name).group(1)) for p in run.iterdir() if EPOCH_RE.match(p.name))
    assert epochs == [3, 4]
    assert len([p for p in run.iterdir() if BEST_RE.match(p.name)]) == 1


def test_resume_reproduces_the_uninterrupted_run(ocec, data_a, tmp_path):
    flags = ["--data_root", data_a, *TINY, "--warmup_epochs", "1.5", "--plateau_patience", "0"]
    assert ocec("train", *flags, "--output_dir", tmp_path / "straight", "--epochs", 4).code == 0
    assert ocec("train", *flags, "--output_dir", tmp_path / "split", "--epochs", 2).code == 0
    first_leg = only_run(tmp_path / "split")
    result = ocec("train", "--resume", first_leg / "ocec_epoch_0002.pt", "--epochs", 4)
    assert result.code == 0, result.err
    straight = only_run(tmp_path / "straight")
    assert history(first_leg) == history(straight)
    summary = lambda run: {
        k: v
        for k, v in json.loads((run / "summary.json").read_text()).items()
        if k in ("best_f1", "best_epoch", "final_val_f1", "epochs_completed")
    }
    assert summary(first_leg) == summary(straight)
    # the resumed run keeps its folder and its log
    assert (first_leg / "ocec_epoch_0004.pt").is_file() and "resuming" in (first_leg / "train.log").read_text()


def test_resume_from_a_run_folder_takes_the_latest_epoch(ocec, trained_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    result = ocec("train", "--resume", run, "--epochs", 4)
    assert result.code == 0, result.err
    assert "from epoch 3" in result.out and [r["epoch"] for r in history(run)] == [1, 2, 3, 4]


def test_resume_forces_the_checkpoint_architecture(ocec, trained_run):
    result = ocec("train", "--resume", trained_run, "--base_channels", 16, "--epochs", 3)
    assert result.code == 2
    assert "base_channels: checkpoint=8, given=16" in result.err and len(result.err.strip().splitlines()) == 1
    assert result.err.startswith("ocec train: error: --resume: ")


def test_without_val_split_best_is_by_training_f1(ocec, train, tmp_path):
    from ocec.synth import write_synthetic

    write_synthetic(tmp_path / "d", 120, seed=0, style="a", with_split=False)
    result = train(tmp_path / "d", tmp_path / "r", 2, "--train_ratio", 1.0, "--val_ratio", 0, "--test_ratio", 0, *TINY)
    assert result.code == 0, result.err
    run = only_run(tmp_path / "r")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["selection"] == "train_f1"
    assert summary["best_f1"] == pytest.approx(max(r["train_f1"] for r in history(run)))
    assert "no 'split' column" in result.out


def test_epoch_order_mixes_the_requested_share():
    primary = torch.arange(1000) % 2
    mix = torch.zeros(300, dtype=torch.long)
    order = epoch_order(primary, mix, 0.3, balanced=False, generator=torch.Generator().manual_seed(0))
    assert len(order) == 1000
    share = float((order >= 1000).float().mean())
    assert abs(share - 0.3) < 0.02
    assert len(set(order[order < 1000].tolist())) == 700  # B drawn without replacement
    again = epoch_order(primary, mix, 0.3, balanced=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(order, again)


def test_sampler_balances_classes():
    labels = torch.tensor([0] * 900 + [1] * 100)
    order = epoch_order(labels, None, 0.0, balanced=True, generator=torch.Generator().manual_seed(0))
    assert abs(float(labels[order].float().mean()) - 0.5) < 0.05


def test_steps_never_leave_a_single_sample_batch():
    assert steps_per_epoch(65, 32) == 2 and steps_per_epoch(66, 32) == 3 and steps_per_epoch(64, 32) == 2


def test_the_console_entry_point_runs_and_help_lists_defaults():
    result = run_subprocess("train", "--help")
    assert result.returncode == 0
    for flag in ("--pretrain", "--backbone_lr", "--stages", "--mix_ratio", "--plateau_patience", "--use_amp"):
        assert flag in result.stdout
    assert re.search(
        r"--plateau_factor\s+PLATEAU_FACTOR\s+LR multiplier on a plateau \(default: 0.5\)",
        " ".join(result.stdout.split()),
    )


def test_use_amp_on_cpu_trains_in_bfloat16(ocec, data_a, tmp_path):
    result = ocec("train", "--data_root", data_a, "--output_dir", tmp_path, "--epochs", 1, "--use_amp", *TINY)
    assert result.code == 0, result.err
    assert only_run(tmp_path).joinpath("ocec_epoch_0001.pt").is_file()


def test_the_same_seed_reproduces_a_run_and_another_seed_does_not(ocec, data_a, tmp_path):
    def run(seed, name):
        args = ["--data_root", data_a, "--output_dir", tmp_path / name, "--epochs", 2, "--seed", seed, *TINY]
        assert ocec("train", *args).code == 0
        return only_run(tmp_path / name)

    first, again, other = run(7, "a"), run(7, "b"), run(8, "c")
    assert history(first) == history(again)
    assert history(first) != history(other)
    same = [torch.load(r / "ocec_epoch_0002.pt", weights_only=True)["model_state"] for r in (first, again)]
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])
