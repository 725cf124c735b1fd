"""Backbones, heads and margin heads; the upstream import; batched augmentation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FIXTURES
from ocec.augment import augment_batch
from ocec.checkpoint import read_snapshot
from ocec.config import ARCH_VARIANTS, ModelConfig
from ocec.margin import ArcFace, CosFace
from ocec.model import block_plan, build_model


def _separable_batch(n=32, size=(16, 32)):
    """Class 1 bright, class 0 dark: any working model separates them in a few steps."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    x = 0.3 * torch.rand(n, 3, *size, generator=g) + 0.6 * labels.view(n, 1, 1, 1)
    return x, labels


@pytest.mark.parametrize(
    "arch,head,margin", list(itertools.product(ARCH_VARIANTS, ("avg", "avgmax_mlp"), ("none", "cosface", "arcface")))
)
def test_every_combination_trains_and_its_loss_goes_down(arch, head, margin):
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch_variant=arch,
        head_variant=head,
        margin_method=margin,
        base_channels=8,
        num_blocks=3,
        image_size=(16, 32),
        margin_m=0.2,
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
        model = build_model(ModelConfig(arch_variant=arch, base_channels=8, image_size=(16, 32)))
        prefixes = {name.split(".")[0] for name, _ in model.named_parameters()}
        assert prefixes == {"backbone", "head", "margin_head"}
        assert model.backbone.unit_names() == ["stem", "features.0", "features.1", "features.2", "features.3"]


def test_channels_double_at_every_second_block():
    assert block_plan(32, 4) == [(32, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1)]
    assert block_plan(8, 6)[4] == (16, 32, 2) and block_plan(8, 6)[-1] == (32, 32, 1)


@pytest.mark.parametrize("head_cls", [CosFace, ArcFace])
def test_margin_changes_the_training_loss_but_not_eval_logits(head_cls):
    torch.manual_seed(1)
    emb = torch.randn(16, 8)
    labels = torch.arange(16) % 2
    with_margin = head_cls(8, scale=8.0, margin=0.3)
    without = head_cls(8, scale=8.0, margin=0.0)
    without.load_state_dict(with_margin.state_dict())
    loss_m, logit_m = with_margin.training_loss(emb, labels)
    loss_0, logit_0 = without.training_loss(emb, labels)
    assert float(loss_m.detach()) > float(loss_0.detach()) + 1e-3  # a margin makes the target harder
    assert torch.equal(with_margin.logit(emb), without.logit(emb))
    assert torch.allclose(logit_m, logit_0)
    # the margin-free logit is the two-class softmax in sigmoid form
    cos = without.cosine(emb)
    assert torch.allclose(torch.sigmoid(without.logit(emb)), torch.softmax(8.0 * cos, dim=1)[:, 1], atol=1e-6)


def test_arcface_margin_is_exact_where_defined():
    head = ArcFace(4, scale=1.0, margin=0.2)
    cos = torch.tensor([[0.5, 0.1], [-0.3, 0.9]])
    labels = torch.tensor([0, 1])
    out = head.apply_margin(cos, labels)
    assert torch.allclose(out[0, 0], torch.cos(torch.acos(torch.tensor(0.5)) + 0.2))
    assert torch.allclose(out[1, 1], torch.cos(torch.acos(torch.tensor(0.9)) + 0.2))
    assert out[0, 1] == cos[0, 1] and out[1, 0] == cos[1, 0]


def test_init_from_linear_keeps_the_decision_direction():
    torch.manual_seed(0)
    w = torch.randn(1, 8)
    head = CosFace(8, 8.0, 0.35)
    head.init_from_linear(w)
    emb = torch.randn(64, 8)
    assert torch.equal(head.logit(emb) > 0, (emb @ w.T).squeeze(1) > 0)


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


# --- augmentation ----------------------------------------------------------------------------


def test_augmentation_keeps_shape_dtype_and_range():
    x = torch.rand(16, 3, 16, 32)
    for level in ("light", "default"):
        out = augment_batch(x.clone(), level, torch.Generator().manual_seed(0))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert augment_batch(x, "none", torch.Generator()) is x


def test_augmentation_differs_per_sample_and_follows_the_seed():
    image = torch.rand(1, 3, 16, 32)
    batch = image.repeat(8, 1, 1, 1)
    out = augment_batch(batch.clone(), "default", torch.Generator().manual_seed(0))
    distinct = {tuple(out[i].flatten()[:64].tolist()) for i in range(8)}
    assert len(distinct) == 8  # identical inputs, 8 different augmentations
    again = augment_batch(batch.clone(), "default", torch.Generator().manual_seed(0))
    other = augment_batch(batch.clone(), "default", torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_augmentation_flips_about_half_of_a_batch():
    # an image that is dark on the left, bright on the right; only a flip reverses that
    x = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(256, 3, 16, 32).contiguous()
    out = augment_batch(x, "light", torch.Generator().manual_seed(3))
    flipped = (out[..., :4].mean((1, 2, 3)) > out[..., -4:].mean((1, 2, 3))).float().mean()
    assert 0.35 < float(flipped) < 0.65


def test_bce_margin_none_matches_plain_bce():
    model = build_model(ModelConfig(margin_method="none", base_channels=8, image_size=(16, 32)))
    emb = torch.randn(10, model.head.out_features)
    labels = torch.arange(10) % 2
    loss, logit = model.margin_head.training_loss(emb, labels)
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logit, labels.float()))
