"""--teacher: distillation from a bigger model (or an ensemble) on exactly the student's augmented batches."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, TINY_TRAIN, history, only_run, train_once

from ocec.core.config import ModelConfig
from ocec.engine.distributed import TrainStep
from ocec.finetune import distill
from ocec.models.model import OcecModel, build_model


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, data_a):
    """A wider model at another input size (24x48): the student's batches are resized for it."""
    flags = ["--image_size", "24x48", "--base_channels", 16, "--num_blocks", 3, *TINY_TRAIN]
    return train_once(tmp_path_factory, "teacher", "--data_root", data_a, "--epochs", 2, *flags)


def test_the_distillation_loss_is_the_softened_binary_cross_entropy_mixed_with_the_margin_loss():
    torch.manual_seed(0)
    model = build_model(ModelConfig(base_channels=8, num_blocks=2, image_size=(16, 32))).eval()
    x, y, t = torch.rand(6, 3, 16, 32), torch.tensor([0, 1, 0, 1, 1, 0]), torch.randn(6) * 3
    plain, _ = TrainStep(model)(x, y, None)
    mixed, _ = TrainStep(model, kd_alpha=0.25, kd_temperature=2.0)(x, y, None, t)
    z = model(x)
    soft = torch.nn.functional.binary_cross_entropy(torch.sigmoid(z / 2), torch.sigmoid(t / 2)) * 4
    assert float(mixed.detach()) == pytest.approx(0.75 * float(plain.detach()) + 0.25 * float(soft.detach()), rel=1e-5)


def test_the_teacher_sees_exactly_the_augmented_batch_the_student_trains_on(
    train, data_a, teacher_run, tmp_path, monkeypatch
):
    seen = {"teacher": [], "student": []}
    logits, embed = distill.Teacher.logits, OcecModel.embed

    def teacher_logits(self, x):
        seen["teacher"].append(x.clone())
        return logits(self, x)

    def student_embed(self, x):
        if self.training and torch.is_grad_enabled():  # a training step (precise BN runs without gradients)
            seen["student"].append(x.clone())
        return embed(self, x)

    monkeypatch.setattr(distill.Teacher, "logits", teacher_logits)
    monkeypatch.setattr(OcecModel, "embed", student_embed)
    result = train(data_a, tmp_path, 1, *TINY, "--teacher", teacher_run, "--augment", "default")
    assert result.code == 0, result.err
    assert len(seen["teacher"]) == len(seen["student"]) > 1
    assert all(torch.equal(a, b) for a, b in zip(seen["teacher"], seen["student"]))
    assert "teacher: 1 model(s)" in result.out and "baseline/avg (ocec_" in result.out
    assert history(only_run(tmp_path), drop=())[0]["teacher_seconds"] > 0

    # --kd_mixup: both see the same blends, which are not the plain augmented batches of the same seed
    plain = seen["teacher"][0]
    seen["teacher"].clear(), seen["student"].clear()
    flags = ["--teacher", teacher_run, "--augment", "default", "--kd_mixup", 0.5]
    result = train(data_a, tmp_path / "blended", 1, *TINY, *flags)
    assert result.code == 0, result.err
    assert all(torch.equal(a, b) for a, b in zip(seen["teacher"], seen["student"]))
    blended = seen["teacher"][0]
    assert blended.shape == plain.shape and not torch.equal(blended, plain)


def test_a_student_with_teachers_fine_tunes_and_resumes(train, ocec, data_a, trained_run, teacher_run, tmp_path):
    flags = ["--pretrain", trained_run, "--teacher", teacher_run, trained_run, "--kd_alpha", 0.7]
    result = train(data_a, tmp_path, 1, *TINY_TRAIN, *flags)
    assert result.code == 0, result.err
    assert "teacher: 2 model(s)" in result.out  # an ensemble: their logits averaged
    run = only_run(tmp_path)
    assert ocec("train", "--resume", run, "--epochs", 2).code == 0
    assert [r["epoch"] for r in history(run)] == [1, 2]


def test_a_teacher_for_another_question_is_refused_with_one_line(train, data_a, teacher_run, tmp_path):
    raw = torch.load(sorted(teacher_run.glob("ocec_epoch_*.pt"))[-1], weights_only=True)
    raw["label_map"] = {0: "open", 1: "closed"}
    torch.save(raw, tmp_path / "flipped.pt")
    result = train(data_a, tmp_path / "out", 1, *TINY, "--teacher", tmp_path / "flipped.pt")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert "is not 0 closed, 1 open" in result.err
    result = train(data_a, tmp_path / "out", 1, *TINY, "--teacher", teacher_run, "--kd_alpha", 0)
    assert result.code == 2 and "--kd_alpha must be in (0, 1]" in result.err
    result = train(data_a, tmp_path / "out", 1, *TINY, "--teacher", teacher_run, "--kd_mixup", 0.7)
    assert result.code == 2 and "--kd_mixup must be in [0, 0.5]" in result.err
    result = train(data_a, tmp_path / "out", 1, *TINY, "--kd_mixup", 0.5)
    assert result.code == 2 and "--kd_mixup blends images for distillation: it needs --teacher" in result.err
