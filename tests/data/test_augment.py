"""Batched, device-side augmentation."""

from __future__ import annotations

import torch

from ocec.data.augment import LEVELS, augment_batch, blend_batch


def test_augmentation_keeps_shape_dtype_and_range():
    x = torch.rand(16, 3, 16, 32)
    for level in ("light", "default", "shift"):
        out = augment_batch(x.clone(), level, torch.Generator().manual_seed(0))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert augment_batch(x, "none", torch.Generator()) is x
    assert LEVELS == ("none", "light", "default", "shift")


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


def test_light_changes_colour_only_and_default_also_moves_pixels():
    x = torch.zeros(64, 3, 16, 32)
    x[:, :, 6:10, 14:18] = 1.0  # a bright square in the middle
    light = augment_batch(x.clone(), "light", torch.Generator().manual_seed(0))
    default = augment_batch(x.clone(), "default", torch.Generator().manual_seed(0))
    # colour changes are per-image affine maps of intensity: the black top rows stay uniform ...
    assert float(light[:, :, :4].std(dim=(2, 3)).max()) < 1e-6
    # ... while zoom, shift, blur and noise move pixels there
    assert float(default[:, :, :4].std(dim=(2, 3)).max()) > 1e-3


def test_the_shift_preset_greys_erases_and_lowers_the_resolution_of_a_share_of_the_batch():
    x = torch.rand(64, 3, 32, 64)
    out = augment_batch(x.clone(), "shift", torch.Generator().manual_seed(3))
    grey = (out[:, 0] - out[:, 1]).abs().amax((1, 2)) < 1e-6
    assert 10 < int(grey.sum()) < 54  # grey_p 0.5: some, not all
    # an erased rectangle is flat: at least a 5x5 patch without any variation
    flat = torch.nn.functional.max_pool2d(-out, 5, 1) == torch.nn.functional.max_pool2d(out, 5, 1).neg()
    assert 4 < int(flat.flatten(1).any(1).sum()) < 40
    # noise images lose their high frequencies when blurred or resized: neighbour differences shrink for some
    rough = (out[..., 1:] - out[..., :-1]).abs().mean((1, 2, 3))
    assert int((rough < 0.5 * (x[..., 1:] - x[..., :-1]).abs().mean()).sum()) > 5


def test_blending_keeps_each_image_dominant_and_follows_the_seed():
    # image i is filled with the value i: a blend's value tells how much of another image went in
    x = torch.arange(64, dtype=torch.float32).view(64, 1, 1, 1).expand(64, 3, 8, 16).contiguous() / 64
    out = blend_batch(x, 0.5, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    flat = out[:, 0]
    assert torch.equal(flat, flat[:, :1, :1].expand_as(flat))  # one weight per image, not per pixel
    moved = (out - x)[:, 0, 0, 0].abs()
    assert int((moved > 1e-6).sum()) > 48  # nearly every image has a partner other than itself
    # the partner weighs at most 0.5, so each image stays nearer to itself than to the furthest other
    assert bool((moved <= 0.5 * (63 / 64) + 1e-6).all())
    again = blend_batch(x, 0.5, torch.Generator().manual_seed(0))
    other = blend_batch(x, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.equal(out, other)
    light = blend_batch(x, 0.1, torch.Generator().manual_seed(0))
    assert float((light - x).abs().max()) < float((out - x).abs().max())
