"""finetune.py: BatchNorm adaptation, weight EMA, L2-SP, hard-example weights."""

from __future__ import annotations

import torch

from ocec.core.config import ModelConfig
from ocec.data.dataset import Split
from ocec.engine.batchnorm import adapt_batchnorm
from ocec.finetune.techniques import L2SP, hard_weights, weight_ema
from ocec.models.model import build_model

CFG = ModelConfig(base_channels=8, num_blocks=2, image_size=(16, 32))


def _split(n=64, bright=True) -> Split:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(120 if bright else 0, 255 if bright else 80, (n, 3, 16, 32), dtype=torch.uint8, generator=g)
    return Split("train", images, torch.arange(n), torch.arange(n) % 2)


def test_bn_adaptation_changes_running_statistics_and_no_weight():
    torch.manual_seed(0)
    model = build_model(CFG).eval()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    before = model.backbone.stem[1].running_mean.clone()
    count = adapt_batchnorm(model, _split(), batch_size=16, device=torch.device("cpu"), max_images=48, seed=0)
    assert count == 48 and not model.training  # back in the mode it was in
    after = model.backbone.stem[1].running_mean
    assert not torch.allclose(before, after)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    # the statistics are those of the (normalised) images the model saw: bright images, positive stem means
    x = _split().take(slice(None)).float() / 255
    with torch.no_grad():
        stem_out = model.backbone.stem[0](x)
    assert float((after - stem_out.mean((0, 2, 3))).abs().max()) < 0.05


def test_bn_adaptation_takes_a_split_that_leaves_one_image_for_the_last_batch():
    """17 images in batches of 16 would leave one image, which BatchNorm1d (the avgmax_mlp head) refuses."""
    model = build_model(ModelConfig(base_channels=8, num_blocks=2, image_size=(16, 32), head_variant="avgmax_mlp"))
    assert adapt_batchnorm(model, _split(17), batch_size=16, device=torch.device("cpu"), max_images=100, seed=0) == 17
    assert adapt_batchnorm(model, _split(1), batch_size=16, device=torch.device("cpu"), max_images=100, seed=0) == 0


def test_ema_equals_a_hand_computed_average():
    torch.manual_seed(0)
    model = build_model(CFG)
    ema = weight_ema(model, 0.9)
    expected = {k: v.clone().float() for k, v in model.state_dict().items()}
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update_parameters(model)
        current = model.state_dict()
        for k in expected:
            if current[k].is_floating_point():
                # the first update copies the weights; later ones move 10% of the way towards them
                expected[k] = current[k].clone() if step == 0 else 0.9 * expected[k] + 0.1 * current[k]
    averaged = ema.module.state_dict()
    for k, v in expected.items():
        if averaged[k].is_floating_point():
            assert torch.allclose(averaged[k], v, atol=1e-6), k
    assert int(ema.n_averaged) == 3


def test_l2sp_pulls_the_backbone_towards_its_start_and_only_the_backbone():
    torch.manual_seed(0)
    model = build_model(CFG)
    pull = L2SP(model, alpha=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
            p.grad = torch.zeros_like(p)
    pull.add_to_gradients()
    for name, p in model.named_parameters():
        expected = 0.5 if name.startswith("backbone.") else 0.0
        assert torch.allclose(p.grad, torch.full_like(p, expected)), name
    assert set(pull.state_dict()) == {n for n, _ in model.named_parameters() if n.startswith("backbone.")}


def test_hard_weights_follow_the_loss_within_bounds():
    w = hard_weights(torch.tensor([0.01, 1.0, 2.0, float("nan"), 1000.0]))
    assert w[3] == 1.5  # never seen: the median of the known losses
    assert w[4] == 15.0 and w[0] == 0.15  # bounded to [median / 10, median * 10]
    assert w[2] > w[1] > w[0]


def test_frozen_batchnorm_keeps_its_statistics_and_normalises_as_at_validation_while_others_are_measured():
    """With every BatchNorm but the head's frozen, the head's new statistics are those of the features the
    frozen layers give in eval mode (their running statistics), as validation will see them."""
    torch.manual_seed(0)
    model = build_model(CFG).eval()
    frozen = frozenset(
        n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and n != "head.norm"
    )
    before = {n: model.get_submodule(n).running_mean.clone() for n in frozen}
    seen = []
    hook = model.head.norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(_split().take(slice(None)).float().div(255))
    hook.remove()
    adapt_batchnorm(model, _split(), batch_size=64, device=torch.device("cpu"), max_images=64, seed=0, keep=frozen)
    assert all(torch.equal(model.get_submodule(n).running_mean, before[n]) for n in frozen)
    assert torch.allclose(model.head.norm.running_mean, seen[0].mean(0), atol=1e-5)
