"""`python -m ocec train` end to end: run files, checkpoints, resume, seeds, and what each flag does."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, checkpoint, config, history, only_run, summary

from ocec.data.sampling import steps_per_epoch
from ocec.engine.checkpoint import BEST_RE, EPOCH_RE, best_name

RUN_FILES = ("config.json", "train.log", "history.json", "history.csv", "summary.json")


def test_two_epochs_write_the_run_files_and_a_consistent_best(ocec, train, data_a, tmp_path):
    result = train(data_a, tmp_path, 2, *TINY)
    assert result.code == 0, result.err
    run = only_run(tmp_path)
    assert run.name == "v1" and f"run folder: {run}" in result.out
    for name in (*RUN_FILES, "ocec_epoch_0001.pt", "ocec_epoch_0002.pt"):
        assert (run / name).is_file(), name
    info = summary(run)
    best = [p for p in run.iterdir() if BEST_RE.match(p.name)]
    assert best, "no best checkpoint"
    newest_best = max(best, key=lambda p: int(BEST_RE.match(p.name).group(1)))
    assert newest_best.name == best_name(info["best_epoch"], info["best_f1"])
    assert f"{info['best_f1']:.4f}" in newest_best.name and info["best_checkpoint"] == str(newest_best)
    assert info["selection"] == "val_f1" and info["best_score"] == info["best_f1"]
    rows = history(run)
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
        "trainable_backbone_units",
    ):
        assert key in rows[0], key
    timed = history(run, drop=())
    assert all(r["seconds"] > 0 and r["wall_seconds"] >= r["seconds"] and r["images_per_s"] > 0 for r in timed)
    assert max(r["val_f1"] for r in rows) == pytest.approx(info["best_f1"])
    csv_lines = (run / "history.csv").read_text().splitlines()
    assert "val_fisher" in csv_lines[0].split(",") and len(csv_lines) == 3
    cfg = config(run)
    assert cfg["model"]["image_size"] == [16, 32] and cfg["train"]["epochs"] == 2
    assert "epoch 2/2" in (run / "train.log").read_text() and "run folder" in (run / "train.log").read_text()
    # a second run goes to v2, never overwriting v1
    assert train(data_a, tmp_path, 1, *TINY).code == 0
    assert (tmp_path / "v2" / "ocec_epoch_0001.pt").is_file()


def test_keep_last_and_keep_best_flags_prune_a_real_run(train, data_a, tmp_path):
    assert train(data_a, tmp_path, 4, "--keep_last", 2, "--keep_best", 1, *TINY).code == 0
    run = only_run(tmp_path)
    epochs = sorted(int(EPOCH_RE.match(p.name).group(1)) for p in run.iterdir() if EPOCH_RE.match(p.name))
    assert epochs == [3, 4]
    assert len([p for p in run.iterdir() if BEST_RE.match(p.name)]) == 1


def test_one_optimizer_step_per_batch(train, data_a, tmp_path, monkeypatch):
    steps = []
    real = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or real(self, *a, **k))
    assert train(data_a, tmp_path, 2, *TINY, "--batch_size", 10).code == 0
    run = only_run(tmp_path)
    assert len(steps) == 2 * steps_per_epoch(_train_rows(run), 10)
    assert checkpoint(run / "ocec_epoch_0002.pt")["schedule_state"]["step_count"] == len(steps)


def _train_rows(run) -> int:
    """Training rows of a run, read from its log line 'train N (open M)'."""
    import re

    return int(re.search(r"train (\d+) \(open", (run / "train.log").read_text()).group(1))


def test_resume_reproduces_the_uninterrupted_run(ocec, train, data_a, tmp_path):
    flags = [*TINY, "--warmup_epochs", "1.5", "--plateau_patience", "0"]
    assert train(data_a, tmp_path / "straight", 4, *flags).code == 0
    assert train(data_a, tmp_path / "split", 2, *flags).code == 0
    first_leg = only_run(tmp_path / "split")
    result = ocec("train", "--resume", first_leg / "ocec_epoch_0002.pt", "--epochs", 4)
    assert result.code == 0, result.err
    straight = only_run(tmp_path / "straight")
    assert history(first_leg) == history(straight)
    keys = ("best_f1", "best_epoch", "final_val_f1", "epochs_completed")
    assert {k: summary(first_leg)[k] for k in keys} == {k: summary(straight)[k] for k in keys}
    # the resumed run keeps its folder and its log
    assert (first_leg / "ocec_epoch_0004.pt").is_file() and "resuming" in (first_leg / "train.log").read_text()
    final = [checkpoint(r / "ocec_epoch_0004.pt")["model_state"] for r in (first_leg, straight)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


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


def test_resume_warns_about_every_flag_it_does_not_take(ocec, trained_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    result = ocec("train", "--resume", run, "--epochs", 4, "--dropout", 0.1, "--lr", 1.0, "--device", "cpu")
    assert result.code == 0, result.err
    assert "taken from the checkpoint, not the command line: --dropout, --lr" in result.out
    assert checkpoint(run / "ocec_epoch_0004.pt")["model_config"]["dropout"] == 0.3


def test_without_val_split_best_is_by_training_f1(train, tmp_path):
    from ocec.data.synth import write_synthetic

    write_synthetic(tmp_path / "d", 120, seed=0, style="a", with_split=False)
    result = train(tmp_path / "d", tmp_path / "r", 2, "--train_ratio", 1.0, "--val_ratio", 0, "--test_ratio", 0, *TINY)
    assert result.code == 0, result.err
    run = only_run(tmp_path / "r")
    assert summary(run)["selection"] == "train_f1"
    assert summary(run)["best_f1"] == pytest.approx(max(r["train_f1"] for r in history(run)))
    assert "no 'split' column" in result.out


def test_a_single_class_val_split_selects_on_val_loss(train, data_a, tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(data_a / "dataset.parquet")
    labels = np.array(table.column("class_id").to_pylist())
    splits = np.where(labels == 1, "train", np.array(table.column("split").to_pylist()))  # val keeps only closed
    pq.write_table(table.set_column(0, "split", pa.array(splits.tolist())), tmp_path / "d.parquet")
    result = train(tmp_path / "d.parquet", tmp_path / "r", 3, *TINY)
    assert result.code == 0, result.err
    assert result.out.count("only one class") == 1 and "selecting on val loss" in result.out
    run = only_run(tmp_path / "r")
    rows = history(run)
    assert all(r["val_f1"] is None and r["val_roc_auc"] is None and r["val_fisher"] is None for r in rows)
    best = min(rows, key=lambda r: r["val_loss"])
    assert summary(run)["selection"] == "val_loss" and summary(run)["best_epoch"] == best["epoch"]
    assert summary(run)["best_checkpoint"].endswith(
        f"ocec_best_epoch{best['epoch']:04d}_loss_{best['val_loss']:.4f}.pt"
    )


def test_use_amp_on_cpu_trains_under_bfloat16_autocast(train, data_a, tmp_path, monkeypatch):
    from ocec.models.model import OcecModel

    seen = []
    real = OcecModel.embed

    def spy(self, x):
        out = real(self, x)
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype))
        return out

    monkeypatch.setattr(OcecModel, "embed", spy)
    assert train(data_a, tmp_path / "amp", 1, "--use_amp", *TINY).code == 0
    assert seen and all(s == (True, torch.bfloat16, torch.bfloat16) for s in seen)
    seen.clear()
    assert train(data_a, tmp_path / "fp32", 1, *TINY).code == 0
    assert seen and all(not enabled and dtype == torch.float32 for enabled, _, dtype in seen)


def test_the_same_seed_reproduces_a_run_and_another_seed_does_not(train, data_a, tmp_path):
    def run(seed, name):
        assert train(data_a, tmp_path / name, 2, "--seed", seed, *TINY).code == 0
        return only_run(tmp_path / name)

    first, again, other = run(7, "a"), run(7, "b"), run(8, "c")
    assert history(first) == history(again)
    assert history(first) != history(other)
    same = [checkpoint(r / "ocec_epoch_0002.pt")["model_state"] for r in (first, again)]
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])


# --- what each flag does ------------------------------------------------------------------------------


@pytest.mark.parametrize("balance", ["pos_weight", "sampler", "none"])
def test_balance_weights_the_loss_or_the_sampling(train, data_a, tmp_path, monkeypatch, balance):
    from ocec.models.margin import CosFace

    weights, labels = [], []
    real = CosFace.training_loss

    def spy(self, embedding, y, class_weight=None):
        weights.append(class_weight)
        labels.append(y)
        return real(self, embedding, y, class_weight)

    monkeypatch.setattr(CosFace, "training_loss", spy)
    assert train(data_a, tmp_path, 1, *TINY, "--balance", balance).code == 0
    if balance == "pos_weight":
        w = weights[0]
        open_share = float(torch.cat(labels).float().mean())
        assert w is not None and torch.allclose(
            w * torch.tensor([1 - open_share, open_share]), torch.tensor([0.5, 0.5]), atol=0.02
        )
    else:
        assert all(w is None for w in weights)


def test_grad_clip_bounds_the_gradient_norm(train, data_a, tmp_path, monkeypatch):
    norms = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, m, *a, **k: norms.append(m) or real(p, m, *a, **k))
    assert train(data_a, tmp_path / "c", 1, *TINY, "--grad_clip", 0.5).code == 0
    assert norms and set(norms) == {0.5}
    norms.clear()
    assert train(data_a, tmp_path / "n", 1, *TINY).code == 0
    assert set(norms) == {float("inf")}


def test_min_lr_never_raises_a_group_rate(train, data_a, tmp_path):
    result = train(data_a, tmp_path, 2, *TINY, "--backbone_lr", 1e-5, "--min_lr", 1e-4, "--plateau_patience", 0)
    assert result.code == 0, result.err
    assert all(r["lr_backbone"] == pytest.approx(1e-5) for r in history(only_run(tmp_path)))


@pytest.mark.parametrize("metric,pick", [("val_f1", max), ("val_loss", min)])
def test_plateau_metric_is_what_the_schedule_tracks(train, data_a, tmp_path, metric, pick):
    assert train(data_a, tmp_path, 3, *TINY, "--plateau_metric", metric, "--plateau_patience", 5).code == 0
    run = only_run(tmp_path)
    tracked = checkpoint(run / "ocec_epoch_0003.pt")["schedule_state"]["best"]
    assert tracked == pytest.approx(pick(r[metric] for r in history(run)))


def test_weight_decay_goes_to_weights_not_to_norms_and_biases(train, data_a, tmp_path):
    assert train(data_a, tmp_path, 1, *TINY, "--weight_decay", 0.05).code == 0
    groups = checkpoint(only_run(tmp_path) / "ocec_epoch_0001.pt")["optimizer_state"]["param_groups"]
    decay = {g["name"]: g["weight_decay"] for g in groups}
    assert decay["backbone"] == 0.05 and decay["backbone_no_decay"] == 0.0 and decay["margin_head"] == 0.05


def test_head_variant_and_margin_flags_shape_the_model(train, data_a, tmp_path):
    flags = ["--head_variant", "avgmax_mlp", "--margin_method", "arcface", "--margin_s", 16, "--margin_m", 0.3]
    assert train(data_a, tmp_path, 1, *TINY, *flags).code == 0
    run = only_run(tmp_path)
    model = config(run)["model"]
    assert (model["head_variant"], model["margin_method"], model["margin_s"], model["margin_m"]) == (
        "avgmax_mlp",
        "arcface",
        16.0,
        0.3,
    )
    assert "head.fc.weight" in checkpoint(run / "ocec_epoch_0001.pt")["model_state"]


def test_no_cache_decodes_without_writing_a_cache(train, data_a, tmp_path):
    assert train(data_a, tmp_path / "r1", 1, *TINY, "--cache_dir", tmp_path / "c1", "--no_cache").code == 0
    assert not (tmp_path / "c1").exists()
    assert train(data_a, tmp_path / "r2", 1, *TINY, "--cache_dir", tmp_path / "c2").code == 0
    assert list((tmp_path / "c2").iterdir())


def test_compile_that_cannot_compile_falls_back_with_one_line(train, data_a, tmp_path, monkeypatch):
    def broken_compile(fn, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler found\nlong details")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    result = train(data_a, tmp_path / "c", 2, *TINY, "--compile")
    assert result.code == 0, result.err
    assert result.out.count("--compile: cannot compile on this machine (no C++ compiler found)") == 1
    assert train(data_a, tmp_path / "e", 2, *TINY).code == 0
    assert history(only_run(tmp_path / "c")) == history(only_run(tmp_path / "e"))  # the same training, eagerly


def test_all_closed_epochs_are_ranked_by_their_best_threshold_f1(train, data_a, tmp_path, monkeypatch):
    """Epochs 1 and 2 are made to read F1 0 at 0.5 (best-threshold F1 0.6, then 0.7): the best checkpoint is
    epoch 2's and the log says why; epoch 3 takes over if its F1 is > 0 (or 0 with a better best-threshold F1)."""
    import ocec.training.trainer as trainer_mod

    real, calls = trainer_mod.evaluate_split, []

    def zero_f1_early(model, split, **kwargs):
        metrics, probs = real(model, split, **kwargs)
        if kwargs.get("desc") is None and len(calls) < 2:
            calls.append(1)
            metrics = {**metrics, "f1": 0.0, "best_f1": (0.6, 0.7)[len(calls) - 1]}
        return metrics, probs

    monkeypatch.setattr(trainer_mod, "evaluate_split", zero_f1_early)
    result = train(data_a, tmp_path, 3, *TINY)
    assert result.code == 0, result.err
    lines = [ln for ln in result.out.splitlines() if ln.startswith("epoch ")]
    assert lines[0].endswith("[best]") and lines[1].endswith("[best]")
    assert "kept the epoch with the best F1 at the best threshold (0.7000)" in result.out
    rows = history(only_run(tmp_path))
    best_epoch = summary(only_run(tmp_path))["best_epoch"]
    assert best_epoch == (3 if rows[2]["val_f1"] > 0 or rows[2]["val_best_f1"] > 0.7 else 2)
