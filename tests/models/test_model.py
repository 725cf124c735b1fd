"""Backbones and heads: every variant trains; parameter names; the upstream import reproduces its logits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import FIXTURES

from ocec.core.config import ARCH_VARIANTS, HEAD_VARIANTS, ModelConfig
from ocec.finetune.pretrained import read_snapshot
from ocec.models.model import block_plan, build_model, parameter_group_of


def _separable_batch(n=32, size=(16, 32)):
    """Class 1 bright, class 0 dark: any working model separates them in a few steps."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    x = 0.3 * torch.rand(n, 3, *size, generator=g) + 0.6 * labels.view(n, 1, 1, 1)
    return x, labels


@pytest.mark.parametrize(
    "arch,head,margin", list(itertools.product(ARCH_VARIANTS, HEAD_VARIANTS[1:], ("none", "cosface", "arcface")))
)
def test_every_combination_trains_and_its_loss_goes_down(arch, head, margin):
    """A statistical check kept in CI with a wide margin: over 5 initialisation seeds, 1 and 2 threads and
    every combination, the last of 12 losses was at most 0.49 of the first (the bound is 0.8)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch_variant=arch,
        head_variant=head,
        margin_method=margin,
        base_channels=8,
        num_blocks=3,
        image_size=(16, 32),
        margin_m=0.2,
        token_mixer_grid=(2, 2),  # divides every backbone's last map here (4x8, convnext 2x4)
    )
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = _separable_batch()
    losses = []
    for _ in range(12):
        loss, logit = model.margin_head.training_loss(model.embed(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert logit.shape == (32,)
    assert losses[-1] < 0.8 * losses[0], losses
    model.eval()
    probs = model.predict_proba(x)
    assert probs.shape == (32,) and float(probs.min()) >= 0 and float(probs.max()) <= 1


def test_parameter_names_tell_the_groups_apart():
    for arch in ARCH_VARIANTS:
        model = build_model(
            ModelConfig(arch_variant=arch, base_channels=8, image_size=(16, 32), token_mixer_grid=(2, 2))
        )
        prefixes = {name.split(".")[0] for name, _ in model.named_parameters()}
        assert prefixes == {"backbone", "head", "margin_head"}
        assert model.backbone.unit_names() == ["stem", "features.0", "features.1", "features.2", "features.3"]


def test_channels_double_at_every_second_block():
    assert block_plan(32, 4) == [(32, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1)]
    assert block_plan(8, 6)[4] == (16, 32, 2) and block_plan(8, 6)[-1] == (32, 32, 1)


def test_upstream_checkpoint_reproduces_the_golden_logits():
    snap = read_snapshot(FIXTURES / "upstream_baseline.pt")
    assert snap.origin == "upstream" and snap.model_config.margin_method == "none"
    assert snap.model_config.image_size == (32, 64) and snap.model_config.base_channels == 32
    model = build_model(snap.model_config).eval()
    model.load_state_dict(snap.state, strict=True)
    golden = np.load(FIXTURES / "upstream_baseline_golden.npz")
    x = torch.from_numpy(golden["images_uint8"]).float() / 255.0
    with torch.no_grad():
        logits = model(x)
    assert np.abs(logits.numpy() - golden["logits"]).max() < 1e-4
    assert np.abs(model.predict_proba(x).numpy() - golden["prob_open"]).max() < 1e-4


def test_head_variants_differ_and_auto_follows_the_backbone():
    def head(arch, variant):
        cfg = ModelConfig(arch_variant=arch, head_variant=variant, base_channels=8, token_mixer_grid=(2, 4))
        return type(build_model(cfg).head).__name__

    assert head("baseline", "auto") == "AvgHead" and head("inverted_se", "auto") == "AvgMaxMLPHead"
    assert head("convnext", "auto") == "TokenMixerHead" and head("convnext_v1", "auto") == "AvgMaxMLPHead"
    assert head("baseline", "avgmax_mlp") == "AvgMaxMLPHead" and head("inverted_se", "avg") == "AvgHead"


def test_parameter_group_of_reads_the_prefix():
    assert parameter_group_of("backbone.features.0.depthwise.0.weight") == "backbone"
    assert parameter_group_of("margin_head.weight") == "margin_head"
