"""Contact sheets people look at instead of reading tables: the top label suspects of an audit, and the most
confident mistakes of a checkpoint, each crop captioned with its label and probability. Pillow only (it
comes with torchvision), no plotting library."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..core.fileio import atomic_write

TILE = 3  # each crop drawn at 3x its size (32x64 -> 96x192): readable, and a 24-crop sheet stays small
CAPTION = 26  # pixels of text under each crop
BACKGROUND, INK = (255, 255, 255), (20, 20, 20)


def _font():
    return ImageFont.load_default()


def sheet(title: str, crops: np.ndarray, captions: list[str], columns: int = 6) -> Image.Image:
    """One titled grid of uint8 [N, 3, H, W] crops with a caption line (or two, '\\n') under each."""
    h, w = crops.shape[2:4] if crops.ndim == 4 else (32, 64)
    cell_w, cell_h = w * TILE + 8, h * TILE + CAPTION + 8
    rows = max(1, -(-len(crops) // columns))
    image = Image.new("RGB", (max(columns * cell_w, 420), 24 + rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), title if len(crops) else f"{title}: none", fill=INK, font=_font())
    for i, (crop, caption) in enumerate(zip(crops, captions)):
        x, y = (i % columns) * cell_w + 4, 24 + (i // columns) * cell_h
        tile = Image.fromarray(np.ascontiguousarray(crop.transpose(1, 2, 0))).resize((w * TILE, h * TILE))
        image.paste(tile, (x, y))
        draw.multiline_text((x, y + h * TILE + 2), caption, fill=INK, font=_font(), spacing=1)
    return image


def stack(parts: list[Image.Image], beside: Image.Image | None = None) -> Image.Image:
    """Sheets one under the other, with `beside` (a text panel) to their right."""
    width = max(p.width for p in parts)
    height = sum(p.height for p in parts)
    extra = beside.width if beside is not None else 0
    out = Image.new("RGB", (width + extra, max(height, beside.height if beside else 0)), BACKGROUND)
    y = 0
    for part in parts:
        out.paste(part, (0, y))
        y += part.height
    if beside is not None:
        out.paste(beside, (width, 0))
    return out


def text_panel(lines: list[str]) -> Image.Image:
    width = 8 + 7 * max((len(line) for line in lines), default=10)
    image = Image.new("RGB", (width, 12 + 14 * len(lines)), BACKGROUND)
    ImageDraw.Draw(image).multiline_text((6, 6), "\n".join(lines), fill=INK, font=_font(), spacing=4)
    return image


def save_png(image: Image.Image, path: str | Path) -> Path:
    return atomic_write(path, lambda f: image.save(f, format="PNG"))


def confident_mistakes(labels: np.ndarray, probs: np.ndarray, threshold: float, count: int):
    """-> (false positives by falling probability, false negatives by rising probability), `count` each."""
    predicted = probs >= threshold
    fp = np.flatnonzero((labels == 0) & predicted)
    fn = np.flatnonzero((labels == 1) & ~predicted)
    return fp[np.argsort(-probs[fp], kind="stable")][:count], fn[np.argsort(probs[fn], kind="stable")][:count]


def error_gallery(
    crops: np.ndarray, labels: np.ndarray, probs: np.ndarray, threshold: float, per_source: dict | None, count: int = 18
) -> Image.Image:
    """The `count` most confident false positives (closed crops called open, highest probability first) and
    false negatives (open crops called closed, lowest first), with the per-source table beside them."""
    fp, fn = confident_mistakes(labels, probs, threshold, count)
    parts = [
        sheet(
            f"most confident false positives (closed, called open at >= {threshold:.2f}): {len(fp)} shown",
            crops[fp],
            [f"closed  p(open) {probs[i]:.3f}" for i in fp],
        ),
        sheet(
            f"most confident false negatives (open, called closed): {len(fn)} shown",
            crops[fn],
            [f"open  p(open) {probs[i]:.3f}" for i in fn],
        ),
    ]
    lines = ["per source", f"{'source':<28}{'n':>6}{'f1':>7}{'acc':>7}"]
    for name, block in sorted((per_source or {}).items()):
        f1, acc = block.get("f1"), block.get("accuracy")
        f1_text = f"{f1:.3f}" if isinstance(f1, float) else "-"
        acc_text = f"{acc:.3f}" if isinstance(acc, float) else "-"
        lines.append(f"{name[:27]:<28}{block.get('samples', 0):>6}{f1_text:>7}{acc_text:>7}")
    return stack(parts, text_panel(lines) if per_source else None)
