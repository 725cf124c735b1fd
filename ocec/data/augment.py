"""Batched augmentation on the training device: one call per batch, per-sample random parameters.

Every random number comes from the `generator` passed in, so an epoch's augmentation is a
function of its seed. No per-sample Python: colour jitter is one broadcast affine map, flip,
zoom and shift are one `grid_sample`, blur is shifted sums blended in by a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.config import AUGMENT_LEVELS


@dataclass(frozen=True)
class AugmentStrength:
    flip: float = 0.5
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    translate: float = 0.0  # fraction of the image size
    scale: float = 0.0  # +- relative zoom
    blur_p: float = 0.0
    noise_p: float = 0.0
    noise_std: float = 0.0
    grey_p: float = 0.0  # grey (IR-like) images
    downscale_p: float = 0.0  # down then up again by a factor in [0.3, 0.7]: low-resolution crops
    erase_p: float = 0.0  # a random rectangle filled with the image's mean (random erasing, Zhong et al. 2020)


STRENGTH = {
    "light": AugmentStrength(brightness=0.15, contrast=0.15, saturation=0.15),
    "default": AugmentStrength(
        brightness=0.25,
        contrast=0.25,
        saturation=0.25,
        translate=0.06,
        scale=0.08,
        blur_p=0.2,
        noise_p=0.2,
        noise_std=0.03,
    ),
    # aimed at what separates a colour dataset A from a grey, small, blurred B; measured in docs/finetune.md
    "shift": AugmentStrength(
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        translate=0.06,
        scale=0.1,
        blur_p=0.4,
        noise_p=0.4,
        noise_std=0.06,
        grey_p=0.5,
        downscale_p=0.4,
        erase_p=0.25,
    ),
}
LEVELS = AUGMENT_LEVELS
assert set(STRENGTH) | {"none"} == set(LEVELS), "every augment level needs a strength"
_LUMA = (0.299, 0.587, 0.114)


def _uniform(n: int, spread: float, generator, device) -> torch.Tensor:
    """n factors in [1 - spread, 1 + spread], shaped to broadcast over [N, C, H, W]."""
    return (1.0 + spread * (2.0 * torch.rand(n, generator=generator, device=device) - 1.0)).view(n, 1, 1, 1)


def _identity_grid(x: torch.Tensor) -> torch.Tensor:
    """[1, H, W, 2] sampling coordinates (x, y) in [-1, 1] of pixel centres (align_corners=False)."""
    h, w = x.shape[2:]
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) * 2 + 1) / w - 1
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).unsqueeze(0)


def _blur3x3(x: torch.Tensor) -> torch.Tensor:
    """Separable [1, 2, 1]^2 / 16 blur with replicated borders, as shifted sums (a depthwise conv is
    several times slower on CPU)."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    rows = p[..., :, :-2] + 2 * p[..., :, 1:-1] + p[..., :, 2:]
    return (rows[..., :-2, :] + 2 * rows[..., 1:-1, :] + rows[..., 2:, :]) / 16.0


def augment_batch(x: torch.Tensor, level: str, generator: torch.Generator) -> torch.Tensor:
    """x: float RGB in [0, 1], [N, 3, H, W], on the generator's device -> a new channels-last tensor.

    Written for few passes over the batch (the step is memory-bound): brightness, contrast and
    saturation compose to one affine map per image, x * a + luma(x) * b + c, and the flip is folded
    into the sampling grid of zoom + shift when there is one. Measured on 2 CPU cores, batch 1024
    of 32x64: 88 ms per batch as separate operations, 45 ms fused.
    """
    if level == "none":
        return x
    s = STRENGTH[level]
    n, device = x.shape[0], x.device

    flip = torch.rand(n, generator=generator, device=device) < s.flip
    brightness = _uniform(n, s.brightness, generator, device)
    contrast = _uniform(n, s.contrast, generator, device)
    saturation = _uniform(n, s.saturation, generator, device)
    # b*x, then contrast about the mean luma m, then saturation about the per-pixel luma g:
    # x' = s*c*b * x + c*b*(1 - s) * g + (1 - c)*b * m   (with g and m of the input x)
    luma = torch.tensor(_LUMA, device=device, dtype=x.dtype).view(1, 3, 1, 1)
    grey = (x * luma).sum(1, keepdim=True)
    scale = saturation * contrast * brightness
    offset = (1.0 - contrast) * brightness * grey.mean((2, 3), keepdim=True)
    x = torch.addcmul(torch.addcmul(offset, grey, contrast * brightness * (1.0 - saturation)), x, scale)

    if s.translate or s.scale:
        # Zoom, shift and flip as one sampling grid built by broadcasting (cheaper than affine_grid's bmm).
        zoom = 1.0 / _uniform(n, s.scale, generator, device).view(n, 1, 1, 1)
        shift = s.translate * 2.0 * (2.0 * torch.rand(n, 1, 1, 2, generator=generator, device=device) - 1.0)
        mirror = torch.ones(n, 1, 1, 2, device=device, dtype=x.dtype)
        mirror[..., 0] = 1.0 - 2.0 * flip.view(n, 1, 1).to(x.dtype)  # x coordinate -> -x for flipped images
        grid = zoom * mirror * _identity_grid(x) + shift
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    else:
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)

    if s.grey_p:
        mask = (torch.rand(n, generator=generator, device=device) < s.grey_p).view(n, 1, 1, 1)
        x = torch.where(mask, (x * luma).sum(1, keepdim=True).expand_as(x), x)

    if s.downscale_p:  # one factor per batch (a resize has one output size), applied to a random share
        mask = (torch.rand(n, generator=generator, device=device) < s.downscale_p).view(n, 1, 1, 1)
        factor = 0.3 + 0.4 * float(torch.rand(1, generator=generator, device=device))
        h, w = x.shape[2:]
        small = F.interpolate(x, size=(max(2, round(h * factor)), max(2, round(w * factor))), mode="area")
        x = torch.where(mask, F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False), x)

    if s.blur_p:
        mask = (torch.rand(n, generator=generator, device=device) < s.blur_p).view(n, 1, 1, 1)
        x = torch.where(mask, _blur3x3(x), x)

    if s.noise_p:
        sigma = s.noise_std * torch.rand(n, generator=generator, device=device)
        sigma = sigma * (torch.rand(n, generator=generator, device=device) < s.noise_p)
        # one noise value per pixel, shared by the channels: sensor-like, and a third of the random numbers
        noise = torch.randn((n, 1, *x.shape[2:]), generator=generator, device=device, dtype=x.dtype)
        x = torch.addcmul(x, noise, sigma.view(n, 1, 1, 1))

    if s.erase_p:  # rectangles as coordinate masks: no per-sample Python
        r = torch.rand(n, 5, generator=generator, device=device)
        grid = _identity_grid(x)  # [1, H, W, 2] in [-1, 1]
        centre, half = (2 * r[:, :2] - 1).view(n, 1, 1, 2), (0.2 + 0.3 * r[:, 2:4]).view(n, 1, 1, 2)
        inside = ((grid - centre).abs() < half).all(-1).unsqueeze(1) & (r[:, 4] < s.erase_p).view(n, 1, 1, 1)
        x = torch.where(inside, x.mean((2, 3), keepdim=True), x)

    # grid_sample returns NCHW whatever it was given: hand the model channels-last again
    return x.clamp_(0.0, 1.0).contiguous(memory_format=torch.channels_last)


def blend_batch(x: torch.Tensor, most: float, generator: torch.Generator) -> torch.Tensor:
    """Each image blended with another image of the batch, the other weighted U(0, most) with most <= 0.5,
    so that each keeps its own label for the margin loss (mixup as "function matching", Beyer et al. 2022: the
    teacher is asked about images between the training images, where its answer is not the label)."""
    n = x.shape[0]
    partner = torch.randperm(n, generator=generator, device=x.device)
    weight = most * torch.rand(n, generator=generator, device=x.device, dtype=x.dtype).view(n, 1, 1, 1)
    return torch.lerp(x, x[partner], weight).contiguous(memory_format=torch.channels_last)
