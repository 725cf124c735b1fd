"""Classifier heads: the linear logit (margin none), CosFace and ArcFace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ocec.core.config import ModelConfig
from ocec.models.margin import ArcFace, CosFace
from ocec.models.model import build_model


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


def test_bce_margin_none_matches_plain_bce():
    model = build_model(ModelConfig(margin_method="none", base_channels=8, image_size=(16, 32)))
    emb = torch.randn(10, model.head.out_features)
    labels = torch.arange(10) % 2
    loss, logit = model.margin_head.training_loss(emb, labels)
    assert torch.allclose(loss, F.binary_cross_entropy_with_logits(logit, labels.float()))


@pytest.mark.parametrize("method", ["none", "cosface", "arcface"])
def test_class_weights_weight_each_class_in_the_loss(method):
    torch.manual_seed(0)
    model = build_model(ModelConfig(margin_method=method, base_channels=8, image_size=(16, 32)))
    emb = torch.randn(12, model.head.out_features)
    labels = torch.tensor([0] * 9 + [1] * 3)
    weight = torch.tensor([0.5, 2.0])
    weighted, _ = model.margin_head.training_loss(emb, labels, weight)
    if method == "none":  # BCE: the open class counts pos_weight = w_open / w_closed times
        logit = model.margin_head.logit(emb)
        expected = F.binary_cross_entropy_with_logits(logit, labels.float(), pos_weight=weight[1] / weight[0])
    else:  # cross-entropy: the weighted mean of the per-row losses
        per_row = torch.stack(
            [model.margin_head.training_loss(emb[i : i + 1], labels[i : i + 1])[0] for i in range(12)]
        )
        w = weight[labels]
        expected = (w * per_row).sum() / w.sum()
    assert torch.allclose(weighted, expected, atol=1e-6)
    assert not torch.allclose(weighted, model.margin_head.training_loss(emb, labels)[0])
