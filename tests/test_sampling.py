"""Which samples each step trains on: seeded epoch orders, mixing, balancing, step counts."""

from __future__ import annotations

import torch

from ocec.sampling import class_weight, epoch_order, epoch_seed, steps_per_epoch


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


def test_epoch_seeds_differ_by_epoch_and_stream():
    seeds = {epoch_seed(42, e, s) for e in range(1, 50) for s in (1, 2, 3)}
    assert len(seeds) == 49 * 3


def test_class_weight_makes_both_classes_count_equally():
    weight = class_weight(0.2, "pos_weight")
    assert torch.allclose(weight * torch.tensor([0.8, 0.2]), torch.tensor([0.5, 0.5]))
    assert class_weight(0.2, "sampler") is None and class_weight(0.2, "none") is None
