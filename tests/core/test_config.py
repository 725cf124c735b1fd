"""Configs and settings: defaults in one place, validation, stages, recipes, and merging settings with a
checkpoint's configs."""

from __future__ import annotations

import pytest

from ocec.core.config import MARGIN_DEFAULTS, ModelConfig, Stage, TrainConfig, parse_stages
from ocec.core.errors import UserError
from ocec.training.settings import (
    finetune_settings,
    pretrained_model_config,
    recipe_settings,
    resumed_configs,
    scratch_model_config,
    split_settings,
)


def test_parse_stages_and_errors():
    assert parse_stages("1:0:1e-4, 11:0.5:3e-5,1000:0.75") == [
        Stage(1, 0.0, 1e-4),
        Stage(11, 0.5, 3e-5),
        Stage(1000, 0.75, None),
    ]
    for bad, message in [
        ("1:0,1:0.5", "must increase"),
        ("1:1.5", r"\[0, 1\]"),
        ("0:0.5", ">= 1"),
        ("1:0.5,3:0.2", "cannot shrink"),
        ("a:b", "epoch:fraction"),
        ("2:0.5:-1", "positive"),
        ("", "no stage"),
    ]:
        with pytest.raises(UserError, match=message):
            parse_stages(bad)


def test_simple_flags_become_stages_and_conflict_with_stages():
    assert TrainConfig(freeze_backbone=True).stage_plan() == [Stage(1, 0.0, None)]
    cfg = TrainConfig(freeze_backbone=True, unfreeze_backbone_epoch=5, unfreeze_ratio=0.5, stage2_lr=2e-5)
    assert cfg.stage_plan() == [Stage(1, 0.0, None), Stage(5, 0.5, 2e-5)]
    assert TrainConfig(unfreeze_backbone_epoch=3).stage_plan() == [Stage(1, 0.0, None), Stage(3, 1.0, None)]
    assert TrainConfig(unfreeze_backbone_epoch=1, freeze_backbone=True).stage_plan() == [Stage(1, 1.0, None)]
    assert TrainConfig().stage_plan() == []
    with pytest.raises(UserError, match="--stages replaces"):
        TrainConfig(data_root="d", stages=[Stage(1, 0.0)], freeze_backbone=True).validate()


def test_stages_round_trip_through_plain_data():
    cfg = TrainConfig(data_root="d", stages=parse_stages("1:0:1e-4,3:1"))
    data = cfg.to_dict()
    assert data["stages"] == [
        {"epoch": 1, "fraction": 0.0, "backbone_lr": 1e-4},
        {"epoch": 3, "fraction": 1.0, "backbone_lr": None},
    ]
    assert TrainConfig.from_dict(data) == cfg
    assert TrainConfig.from_dict({**data, "stages": "1:0:1e-4,3:1"}).stages == cfg.stages  # older checkpoints


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"pretrain": ["a.pt"], "resume": "r"}, "--pretrain and --resume exclude each other"),
        ({"data_root": ""}, "--data_root is required"),
        ({"seed": -1}, "--seed must be >= 0"),
        ({"batch_size": 1}, "--batch_size must be an integer >= 2"),
        ({"stage2_lr": 1e-4}, "--stage2_lr applies from --unfreeze_backbone_epoch on"),
        ({"unfreeze_ratio": 0.5}, "--unfreeze_ratio applies from --unfreeze_backbone_epoch on"),
        ({"reinit_head": True}, "--reinit_head applies to --pretrain weights"),
        ({"margin_init": "random"}, "--margin_init applies to --pretrain weights"),
        ({"pretrain": ["a.pt"], "reinit_head": True, "margin_init": "from_linear"}, "--reinit_head discards it"),
        ({"mix_ratio": 0.3}, "--mix_ratio needs --mix_data_root"),
        ({"mix_data_root": "a"}, "--mix_data_root needs --mix_ratio > 0"),
        ({"augment": "heavy"}, "--augment: 'heavy' is not one of none, light, default"),
        ({"min_lr": -1.0}, "--min_lr must be >= 0"),
        ({"plateau_factor": 1.0}, "--plateau_factor must be in (0, 1)"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_validate_names_the_flag(settings, message):
    with pytest.raises(UserError) as info:
        TrainConfig(**{"data_root": "d", **settings}).validate()
    assert message in str(info.value)


def test_margin_defaults_come_from_one_table():
    for method, (s, m) in MARGIN_DEFAULTS.items():
        cfg = ModelConfig(margin_method=method)
        assert (cfg.margin_s, cfg.margin_m) == (s, m)
    assert ModelConfig(margin_method="arcface", margin_m=0.3).margin_m == 0.3


def test_margin_flags_with_margin_none_are_refused():
    with pytest.raises(UserError, match="--margin_s applies to cosface/arcface heads"):
        scratch_model_config({"margin_method": "none", "margin_s": 16.0})
    checkpoint = ModelConfig(margin_method="none")
    with pytest.raises(UserError, match="--margin_m applies"):
        pretrained_model_config(checkpoint, {"margin_m": 0.2})


def test_pretrain_keeps_the_structure_and_accepts_new_margin_hyper_parameters():
    checkpoint = ModelConfig(base_channels=16, num_blocks=3, margin_method="cosface", margin_s=8.0, margin_m=0.35)
    merged = pretrained_model_config(checkpoint, {"margin_s": 16.0, "margin_m": 0.5, "dropout": 0.1})
    assert (merged.base_channels, merged.num_blocks) == (16, 3)
    assert (merged.margin_method, merged.margin_s, merged.margin_m, merged.dropout) == ("cosface", 16.0, 0.5, 0.1)
    # a new method takes its own defaults unless s/m are given
    arc = pretrained_model_config(checkpoint, {"margin_method": "arcface"})
    assert (arc.margin_s, arc.margin_m) == MARGIN_DEFAULTS["arcface"]
    with pytest.raises(UserError, match="base_channels: checkpoint=16, given=32; image_size: checkpoint=32x64"):
        pretrained_model_config(checkpoint, {"base_channels": 32, "image_size": (48, 48), "num_blocks": 3})


def test_resume_overrides_only_what_may_change_and_lists_the_rest():
    saved_train = TrainConfig(data_root="old", epochs=10, lr=1e-3, pretrain=["a.pt"])
    saved_model = ModelConfig(base_channels=16)
    given_train = {"resume": "run", "epochs": 20, "data_root": "moved", "lr": 5.0, "warmup_epochs": 9.0}
    cfg, model, ignored = resumed_configs(saved_train, saved_model, given_train, {"dropout": 0.5})
    assert (cfg.epochs, cfg.data_root, cfg.lr, cfg.warmup_epochs) == (20, "moved", 1e-3, 3.0)
    assert cfg.pretrain == ["a.pt"] and model == saved_model
    assert ignored == ["--dropout", "--lr", "--warmup_epochs"]
    with pytest.raises(UserError, match="--resume: margin_method: checkpoint=cosface, given=arcface"):
        resumed_configs(saved_train, saved_model, {}, {"margin_method": "arcface"})


def test_split_settings_sorts_flags_and_refuses_unknown_names():
    train, model = split_settings({"epochs": 3, "base_channels": 8, "image_size": (16, 32)})
    assert train == {"epochs": 3} and model == {"base_channels": 8, "image_size": (16, 32)}
    with pytest.raises(TypeError, match="unknown training setting.*epoch"):
        split_settings({"epoch": 3})


def test_recipes_scale_with_the_epochs_and_given_flags_win():
    assert recipe_settings("full", 16) == {}
    assert recipe_settings("lp-ft", 16) == {"stages": [Stage(1, 0.0), Stage(5, 1.0)]}
    assert recipe_settings("progressive", 16)["stages"] == [Stage(1, 0.0), Stage(5, 0.5), Stage(9, 1.0)]
    assert recipe_settings("surgical", 16) == {"stages": [Stage(1, 0.5)], "unfreeze_from": "input"}
    assert recipe_settings("lp-ft", 2)["stages"] == [Stage(1, 0.0), Stage(2, 1.0)]
    settings, filled = finetune_settings({"pretrain": ["a.pt"], "epochs": 16, "recipe": "lp-ft", "warmup_epochs": 0})
    assert settings["warmup_epochs"] == 0 and settings["stages"] == [Stage(1, 0.0), Stage(5, 1.0)]
    assert "warmup_epochs" not in filled and filled["bn_adapt"] is True
    with pytest.raises(UserError, match="--recipe lp-ft sets the freezing schedule; --freeze_backbone gives another"):
        finetune_settings({"pretrain": ["a.pt"], "recipe": "lp-ft", "freeze_backbone": True})  # one would be dropped
    settings, _ = finetune_settings({"pretrain": ["a.pt"], "freeze_backbone": True})
    assert "stages" not in settings and settings["recipe"] == "full"  # the default recipe sets no schedule
