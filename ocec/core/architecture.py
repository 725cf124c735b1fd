"""What the architectures are (upstream's names, the heads each gets by default) and the arithmetic of their
feature maps, checked before anything is built. No torch here (the CLI imports it)."""

from __future__ import annotations

import re

from .errors import UserError

# baseline, inverted_se and convnext are the upstream trainer's (PINTO0309/OCEC) layer for layer, so its
# checkpoints of every architecture load. The *_v1 variants are what ocec 0.x built under those names
# (ReLU inverted residuals; a stride-2 ConvNeXt stem): kept so checkpoints written then still load.
ARCH_VARIANTS = ("baseline", "inverted_se", "convnext", "inverted_se_v1", "convnext_v1")
HEAD_VARIANTS = ("auto", "avg", "avgmax_mlp", "transformer", "mlp_mixer")
TOKEN_MIXER_HEADS = ("transformer", "mlp_mixer")
AUTO_HEAD = {  # as upstream
    "baseline": "avg",
    "inverted_se": "avgmax_mlp",
    "convnext": "transformer",
    "inverted_se_v1": "avgmax_mlp",
    "convnext_v1": "avgmax_mlp",
}


def parse_grid(text: str, flag: str = "--token_mixer_grid") -> tuple[int, int]:
    """'2x3' -> (2, 3) (rows x columns of the token grid)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not match or min(int(match.group(1)), int(match.group(2))) < 1:
        raise UserError(f"{flag}: expected HxW such as 2x3, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def feature_map_size(arch: str, image_size: tuple[int, int], num_blocks: int) -> tuple[int, int]:
    """The backbone's last feature map (height, width) for an input size, by the layers' arithmetic: the
    3x3/stride-2/pad-1 convolutions halve rounding up, ConvNeXt's 4x4/stride-4 stem and 2x2 downsamplers
    divide rounding down (convnext_v1's stem: 4x4, stride 2, pad 1)."""
    downsamples = sum(1 for i in range(num_blocks) if i > 0 and i % 2 == 0)
    size = []
    for side in image_size:
        if arch == "convnext":
            side //= 4
            for _ in range(downsamples):
                side //= 2
        elif arch == "convnext_v1":
            side //= 2
            for _ in range(downsamples):
                side //= 2
        else:
            for _ in range(1 + downsamples):
                side = -(-side // 2)
        size.append(side)
    return size[0], size[1]


def upgrade_model_config(data: dict, checkpoint_format: int) -> dict:
    """A model_config as written by an older checkpoint format, in today's terms. Format 1 (ocec 0.x) gave
    its own networks the names inverted_se and convnext, which now mean upstream's: they become *_v1; its
    avgmax_mlp head was as wide as the feature channels (now max(16, channels))."""
    if checkpoint_format >= 2:
        return data
    out = dict(data)
    if out.get("arch_variant") in ("inverted_se", "convnext"):
        out["arch_variant"] += "_v1"
    if out.get("head_variant") == "avgmax_mlp" and out.get("mlp_hidden") is None:
        blocks = int(out.get("num_blocks", 4))
        out["mlp_hidden"] = int(out.get("base_channels", 32)) * 2 ** sum(1 for i in range(blocks) if i and i % 2 == 0)
    return out


def check_feature_map(arch: str, image_size, num_blocks: int, head: str, grid, layers: int) -> None:
    """Refuse, before anything is built, an input the backbone shrinks to nothing or a token grid that
    does not divide the last feature map (naming the grids that would)."""
    fh, fw = feature_map_size(arch, image_size, num_blocks)
    size = f"{image_size[0]}x{image_size[1]}"
    if fh < 1 or fw < 1:
        raise UserError(f"--image_size {size} is too small for --arch_variant {arch}")
    if head not in TOKEN_MIXER_HEADS:
        return
    if not 1 <= layers <= 16:
        raise UserError(f"--token_mixer_layers must be between 1 and 16, got {layers}")
    gh, gw = grid
    if gh < 1 or gw < 1 or fh % gh or fw % gw:
        works = [f"{a}x{b}" for a in range(1, fh + 1) if fh % a == 0 for b in range(1, fw + 1) if fw % b == 0]
        raise UserError(
            f"--token_mixer_grid {gh}x{gw} does not divide the {fh}x{fw} feature map of a {arch} "
            f"backbone at --image_size {size} with {num_blocks} blocks; grids that do: {', '.join(works)}"
        )
