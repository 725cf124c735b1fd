"""Parameter groups, the warmup -> plateau schedule, freezing stages and their parsing."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, checkpoint, only_run

from ocec.core.config import ModelConfig, Stage, parse_stages
from ocec.engine.batchnorm import freeze_batchnorm_statistics
from ocec.engine.optim import (
    LRSchedule,
    active_stage,
    build_optimizer,
    enter_epoch_stage,
    set_backbone_fraction,
    trainable_units,
)
from ocec.models.model import build_model

LRS = {"backbone": 1e-4, "head": 1e-3, "margin_head": 2e-3}


def _schedule(steps_per_epoch=10, warmup_epochs=2.0, factor=0.5, patience=1, mode="min", min_lr=0.0):
    model = build_model(ModelConfig(base_channels=8, num_blocks=2, image_size=(16, 32)))
    opt = build_optimizer(model, LRS, weight_decay=1e-4)
    return opt, LRSchedule(opt, LRS, steps_per_epoch, warmup_epochs, factor, patience, mode, min_lr)


def _lr_of(opt, group):
    return {g["name"]: g["lr"] for g in opt.param_groups}[group]


def test_groups_are_named_and_norms_have_no_weight_decay():
    opt, _ = _schedule()
    names = [g["name"] for g in opt.param_groups]
    assert names == ["backbone", "backbone_no_decay", "head_no_decay", "margin_head"]
    for g in opt.param_groups:
        assert g["weight_decay"] == (0.0 if g["name"].endswith("_no_decay") else 1e-4)
        assert all((p.ndim <= 1) == g["name"].endswith("_no_decay") for p in g["params"])


def test_linear_warmup_per_step_then_full_group_rates():
    opt, sched = _schedule(steps_per_epoch=10, warmup_epochs=2.0)
    assert _lr_of(opt, "head_no_decay") == pytest.approx(1e-3 / 20)  # first step
    for _ in range(9):
        sched.step()
    assert _lr_of(opt, "head_no_decay") == pytest.approx(1e-3 * 10 / 20)  # after epoch 1
    for _ in range(10):
        sched.step()
    assert sched.lrs() == pytest.approx(LRS)  # warmup done: each group at its own rate
    assert _lr_of(opt, "backbone") == pytest.approx(1e-4) and _lr_of(opt, "margin_head") == pytest.approx(2e-3)


def test_zero_warmup_starts_at_full_rate():
    _, sched = _schedule(warmup_epochs=0)
    assert sched.lrs() == pytest.approx(LRS)


def test_plateau_reduces_all_groups_proportionally_after_patience():
    opt, sched = _schedule(steps_per_epoch=1, warmup_epochs=1, factor=0.5, patience=1, min_lr=3e-5)
    assert sched.end_epoch(1.0) is False  # still in warmup: ignored
    sched.step()
    losses = [1.0, 0.9, 0.95, 0.95, 0.8, 0.85, 0.85, 0.85, 0.85]
    reduced = [sched.end_epoch(v) for v in losses]
    assert reduced == [False, False, False, True, False, False, True, False, True]
    # three reductions: x0.125, but the backbone is floored at min_lr
    assert sched.lrs() == pytest.approx({"backbone": 3e-5, "head": 1.25e-4, "margin_head": 2.5e-4})


def test_min_lr_only_floors_reductions_and_never_raises_a_rate():
    """--backbone_lr 1e-5 --min_lr 1e-4 must train the backbone at 1e-5 (it once trained at 1e-4)."""
    lrs = {"backbone": 1e-5, "head": 1e-3, "margin_head": 1e-3}
    model = build_model(ModelConfig(base_channels=8, num_blocks=2, image_size=(16, 32)))
    opt = build_optimizer(model, lrs, weight_decay=0.0)
    sched = LRSchedule(opt, lrs, 1, 0, factor=0.5, patience=0, mode="min", min_lr=1e-4)
    assert sched.lrs() == pytest.approx(lrs) and _lr_of(opt, "backbone") == pytest.approx(1e-5)
    sched.end_epoch(1.0)
    assert sched.end_epoch(2.0) is True  # the head is reduced ...
    assert sched.lrs() == pytest.approx({"backbone": 1e-5, "head": 5e-4, "margin_head": 5e-4})  # ... not the backbone
    for _ in range(5):
        sched.end_epoch(3.0)
    assert sched.lrs() == pytest.approx({"backbone": 1e-5, "head": 1e-4, "margin_head": 1e-4})
    assert sched.end_epoch(4.0) is False  # everything at or below the floor: nothing left to reduce


def test_plateau_on_f1_maximises():
    _, sched = _schedule(steps_per_epoch=1, warmup_epochs=0, patience=0, mode="max")
    assert [sched.end_epoch(v) for v in (0.5, 0.6, 0.6)] == [False, False, True]


def test_schedule_state_round_trips():
    opt, sched = _schedule(steps_per_epoch=3, warmup_epochs=1)
    for _ in range(5):
        sched.step()
    sched.end_epoch(0.4)
    opt2, sched2 = _schedule(steps_per_epoch=3, warmup_epochs=1)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.lrs() == sched.lrs() and sched2.best == 0.4 and sched2.step_count == 5


def test_stage_restart_rewarms_only_the_backbone():
    _, sched = _schedule(steps_per_epoch=10, warmup_epochs=0)
    sched.restart_warmup("backbone", epochs=1, base_lr=3e-5)
    assert sched.lr("backbone") == pytest.approx(3e-5 / 10)
    assert sched.lr("head") == pytest.approx(1e-3)
    for _ in range(9):
        sched.step()
    assert sched.lr("backbone") == pytest.approx(3e-5)


def test_trainable_units_count_from_the_output_side_stem_last():
    units = ["stem", "features.0", "features.1", "features.2", "features.3"]
    assert trainable_units(units, 0.0) == []
    assert trainable_units(units, 0.2) == ["features.3"]
    assert trainable_units(units, 0.5) == ["features.1", "features.2", "features.3"]
    assert trainable_units(units, 0.8) == units[1:]
    assert trainable_units(units, 1.0) == units


def test_set_backbone_fraction_and_frozen_batchnorm():
    model = build_model(ModelConfig(base_channels=8, num_blocks=4, image_size=(16, 32)))
    assert set_backbone_fraction(model, 0.4) == ["features.2", "features.3"]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("backbone.stem", "backbone.features.0", "backbone.features.1")) for n in frozen)
    model.train()
    freeze_batchnorm_statistics(model)
    assert not model.backbone.stem[1].training and model.backbone.features[3].pointwise[1].training
    assert model.head.norm.training


def test_entering_stages_freezes_rewarms_and_announces():
    model = build_model(ModelConfig(base_channels=8, num_blocks=2, image_size=(16, 32)))
    opt = build_optimizer(model, LRS, 0.0)
    sched = LRSchedule(opt, LRS, 10, 0, 0.5, 1)
    stages = parse_stages("1:0:2e-4,3:0.5:5e-5")
    line = enter_epoch_stage(model, sched, stages, 1, rewarm_epochs=1, announce=True)
    assert line == "stage from epoch 1: 0/3 backbone units trainable (backbone frozen)"
    assert sched.base["backbone"] == pytest.approx(2e-4)
    assert enter_epoch_stage(model, sched, stages, 2, rewarm_epochs=1, announce=False) is None
    line = enter_epoch_stage(model, sched, stages, 3, rewarm_epochs=1, announce=False)
    assert "2/3 backbone units trainable (features.0, features.1), backbone lr 5.00e-05, re-warming" in line
    assert sched.lr("backbone") == pytest.approx(5e-5 / 10)  # first step of its re-warm
    sched.step_count += 10
    # resuming mid-way through epoch 3: the schedule state already holds the re-warm, nothing restarts
    enter_epoch_stage(model, sched, stages, 3, rewarm_epochs=1, announce=True, mid_epoch=True)
    assert sched.lr("backbone") == pytest.approx(5e-5)
    assert enter_epoch_stage(model, sched, [], 1, rewarm_epochs=1, announce=True) is None


def test_stage_lookup():
    plan = [Stage(1, 0.0, None), Stage(5, 0.5, 2e-5)]
    assert active_stage(plan, 4) == Stage(1, 0.0, None) and active_stage(plan, 7) == Stage(5, 0.5, 2e-5)
    assert active_stage([Stage(3, 0.5)], 2) is None


def test_adamw_skips_frozen_parameters():
    model = build_model(ModelConfig(base_channels=8, num_blocks=2, image_size=(16, 32)))
    opt = build_optimizer(model, LRS, 0.1)
    set_backbone_fraction(model, 0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, _ = model.margin_head.training_loss(model.embed(torch.rand(4, 3, 16, 32)), torch.tensor([0, 1, 0, 1]))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p)
        assert changed == (not name.startswith("backbone")), name


def test_compiled_training_loss_equals_the_eager_one():
    """--compile must not change what is computed: loss and gradients agree within 1e-5 (relative);
    the remaining difference is the order of floating-point sums in fused kernels."""
    import shutil

    from ocec.engine.optim import TrainingLoss

    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    torch.manual_seed(0)  # no dropout: compiled code draws its random numbers differently
    model = build_model(ModelConfig(base_channels=8, num_blocks=2, image_size=(16, 32), dropout=0.0))
    x, y = torch.rand(16, 3, 16, 32), torch.arange(16) % 2
    results = []
    for compile in (False, True):
        loss_fn = TrainingLoss(model, compile=compile)
        model.zero_grad(set_to_none=True)
        loss, logit = loss_fn(x, y, None)
        loss.backward()
        assert (loss_fn.compiled is not None) == compile  # compiled, not fallen back
        results.append((loss.detach(), logit.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss0, logit0, grads0), (loss1, logit1, grads1) = results
    assert torch.allclose(loss0, loss1, rtol=1e-5, atol=1e-6)
    assert torch.allclose(logit0, logit1, rtol=1e-5, atol=1e-5)
    for g0, g1 in zip(grads0, grads1):
        assert torch.allclose(g0, g1, rtol=1e-4, atol=1e-5 * float(g0.abs().max()) + 1e-7)


def test_fused_optimizer_skips_a_step_on_the_device():
    from ocec.engine.optim import optimizer_step

    model = build_model(ModelConfig(base_channels=8, num_blocks=2, image_size=(16, 32)))
    opt = build_optimizer(model, LRS, 0.1)
    assert opt.defaults["fused"]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer_step(opt, scaler, torch.tensor(False))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # skipped: no update, no decay
    optimizer_step(opt, scaler, torch.tensor(True))
    assert not any(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(int(s["step"]) == 1 for s in opt.state.values())  # the skipped step is not counted


def test_the_fp16_gradscaler_path_runs_on_cpu(train, data_a, tmp_path, monkeypatch):
    """The CUDA mixed-precision path (float16 autocast + an active GradScaler) exercised where CI can:
    torch runs float16 autocast and GradScaler('cpu') on CPUs too."""
    import ocec.engine.optim as optim_mod
    import ocec.training.job as job_mod

    fp16 = lambda device, use_amp: torch.float16 if use_amp else None  # noqa: E731 - what CUDA would get
    monkeypatch.setattr(optim_mod, "amp_dtype", fp16)
    monkeypatch.setattr(job_mod, "amp_dtype", fp16)
    result = train(data_a, tmp_path, 2, *TINY, "--use_amp")
    assert result.code == 0, result.err
    saved = checkpoint(only_run(tmp_path) / "ocec_epoch_0002.pt")
    assert saved["scaler_state"] is not None and saved["scaler_state"]["scale"] > 0  # the scaler was active
    assert all(torch.isfinite(v).all() for v in saved["model_state"].values() if v.is_floating_point())


def test_an_active_gradscaler_skips_an_overflowing_step_and_lowers_its_scale():
    from ocec.engine.optim import optimizer_step

    layer = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = layer.weight.detach().clone()
    scaler.scale(layer(torch.ones(2, 4)).sum() * float("inf")).backward()
    scaler.unscale_(optimizer)
    optimizer_step(optimizer, scaler, torch.tensor(True))
    assert torch.equal(layer.weight, before) and scaler.get_scale() == 512.0
