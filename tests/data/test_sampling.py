"""Which samples each step trains on: seeded epoch orders, mixing, balancing, step counts."""

from __future__ import annotations

import torch

from ocec.data.sampling import class_weight, epoch_order, epoch_seed, steps_per_epoch


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


def test_a_mixed_pool_gathers_from_both_datasets_without_joining_them():
    from ocec.data.dataset import Split
    from ocec.data.sampling import TrainingPool

    a = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    b = (100 + torch.arange(5, dtype=torch.uint8)).view(5, 1, 1, 1).expand(5, 3, 2, 2).contiguous()
    train = Split("train", a, torch.tensor([1, 3, 5, 7]), torch.tensor([0, 1, 0, 1]))
    mix = Split("train", b, torch.tensor([0, 4]), torch.tensor([1, 1]))
    pool = TrainingPool.build([train], mix, mix_ratio=0.5, balance="none", device=torch.device("cpu"))
    assert len(pool.parts) == 2 and pool.parts[0][0] is a and pool.parts[1][0] is b  # no concatenated copy
    batch = pool.take(torch.tensor([5, 0, 4, 3]))
    assert batch[:, 0, 0, 0].tolist() == [104, 1, 100, 7]
    assert pool.labels.tolist() == [0, 1, 0, 1, 1, 1]


def test_hard_mining_draws_a_sample_in_proportion_to_its_weight():
    weights = torch.ones(100)
    weights[7] = 100.0  # a hundred times the others: about half of the 50 mined draws (100/199)
    order = epoch_order(torch.arange(100) % 2, None, 0.0, False, torch.Generator().manual_seed(0), hard=(0.5, weights))
    assert len(order) == 100 and int((order == 7).sum()) >= 10
    plain = epoch_order(torch.arange(100) % 2, None, 0.0, False, torch.Generator().manual_seed(0))
    assert int((plain == 7).sum()) == 1
