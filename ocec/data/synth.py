"""Synthetic eye crops for the demo and the tests: `python -m ocec synth`.

Each image is rendered with numpy (skin with lighting, almond eye opening with sclera, iris,
pupil and highlight, lids and lashes, eyebrow, occluders, blur, noise) at a random size and
encoded as PNG. `source` names a synthetic subject whose skin, iris colour and eye shape stay
fixed across its images. Style `b` is a shifted domain: infrared-like grey with a colour cast,
bright pupils, darker and flatter lighting, heavier blur and noise, lower resolution and more
half-closed eyes, so a model trained on style `a` transfers only partially. Style `c` is the hard regime
of users' dataset B: style b's look at the size of real detector crops (7-13 px high), under heavy JPEG,
with half-closed and slit eyes on both sides of the open/closed line (labels genuinely ambiguous there);
add `--label_noise` for plain annotation mistakes.
"""

from __future__ import annotations

import io
import multiprocessing
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..core.errors import UserError
from ..core.fileio import TMP_PREFIX
from ..core.progress import progress

SKIN_TONES = np.array(
    [[236, 196, 164], [214, 164, 124], [186, 136, 98], [150, 104, 72], [108, 76, 54], [244, 206, 188], [200, 150, 120]],
    dtype=np.float32,
)
IRIS_COLOURS = np.array(
    [[96, 62, 30], [60, 40, 22], [64, 112, 70], [72, 110, 160], [44, 44, 44], [122, 92, 52]], dtype=np.float32
)
STYLES = ("a", "b", "c")


@dataclass
class Subject:
    skin: np.ndarray
    iris: np.ndarray
    aspect: float
    lid_width: float


def make_subjects(count: int, rng: np.random.Generator) -> list[Subject]:
    return [
        Subject(
            skin=SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.9, 1.08, 3),
            iris=IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))] * rng.uniform(0.8, 1.2, 3),
            aspect=float(rng.uniform(0.32, 0.48)),
            lid_width=float(rng.uniform(0.7, 1.4)),
        )
        for _ in range(count)
    ]


def _soft(distance: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (positive = inside)."""
    return np.clip(distance + 0.5, 0.0, 1.0)


def _paint(img: np.ndarray, alpha: np.ndarray, colour) -> None:
    img *= 1.0 - alpha[..., None]
    img += alpha[..., None] * np.asarray(colour, dtype=np.float32)


def _box_blur(img: np.ndarray, passes: int) -> np.ndarray:
    for _ in range(passes):
        padded = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        img = (padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:] + 2 * img) / 6.0
    return img


def render_eye(rng: np.random.Generator, is_open: bool, subject: Subject, style: str) -> np.ndarray:
    """One eye crop, uint8 [H, W, 3]."""
    shifted, hard = style in ("b", "c"), style == "c"
    # c: as small as real detector crops (upstream measured open eyes about 21x11 px, closed about 15x8)
    h = int(rng.integers(7, 14) if hard else rng.integers(14, 30) if shifted else rng.integers(24, 64))
    w = int(round(h * rng.uniform(1.7, 2.3)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    light = 1.0 + rng.uniform(-0.25, 0.25) * (xx / w - 0.5) + rng.uniform(-0.25, 0.25) * (yy / h - 0.5)
    img = subject.skin[None, None, :] * light[..., None] * rng.uniform(0.85, 1.1)

    cx, cy = w * (0.5 + rng.uniform(-0.08, 0.08)), h * (0.55 + rng.uniform(-0.08, 0.08))
    a = w * rng.uniform(0.3, 0.42)
    b = a * subject.aspect * rng.uniform(0.9, 1.1)
    u2 = np.clip(((xx - cx) / a) ** 2, 0.0, 1.0)
    inside_x = _soft((1.0 - np.abs(xx - cx) / a) * a)
    lid = max(1.0, h / 22.0) * subject.lid_width * rng.uniform(0.8, 1.3)
    lash = np.array([40, 28, 22], dtype=np.float32) * rng.uniform(0.6, 1.2)

    if rng.random() < 0.6:  # eyebrow
        brow_y = cy - b * rng.uniform(1.9, 2.6) - 0.3 * b * (1 - u2)
        _paint(img, 0.55 * _soft(lid * 1.6 - np.abs(yy - brow_y)) * inside_x, lash * 1.3)

    if hard:  # half-closed and slit eyes on both sides of the line: labels genuinely ambiguous there
        openness = rng.uniform(0.12, 1.0) if is_open else rng.uniform(0.0, 0.28)
    elif is_open:
        openness = rng.uniform(0.25, 1.0) if shifted else rng.uniform(0.45, 1.0)
    else:
        openness = rng.uniform(0.0, 0.2) if shifted else rng.uniform(0.0, 0.1)
    upper = cy - b * openness * (1.0 - u2)
    lower = cy + 0.55 * b * openness * (1.0 - u2)
    opening = _soft(np.minimum(yy - upper, lower - yy)) * inside_x
    if openness > 0.05:
        _paint(img, opening, np.array([226, 222, 214]) * rng.uniform(0.8, 1.0))
        ix, iy = cx + a * rng.uniform(-0.3, 0.3), cy + b * rng.uniform(-0.1, 0.15)
        radius = b * rng.uniform(0.75, 0.95)
        dist = np.hypot(xx - ix, yy - iy)
        _paint(img, _soft(radius - dist) * opening, subject.iris)
        pupil = np.array([235, 235, 235]) if shifted else np.array([12, 12, 14])
        _paint(img, _soft(0.45 * radius - dist) * opening, pupil)
        glint = np.hypot(xx - ix - 0.3 * radius, yy - iy + 0.3 * radius)
        _paint(img, 0.9 * _soft(0.16 * radius - glint) * opening, np.array([250, 250, 250]))
    _paint(img, _soft(lid - np.abs(yy - upper)) * inside_x, lash)
    _paint(img, 0.5 * _soft(lid * 0.6 - np.abs(yy - lower)) * inside_x, lash * 1.8)
    crease = cy - b * (0.6 + openness * 0.9) * (1.0 - u2)
    _paint(img, 0.25 * _soft(lid * 0.7 - np.abs(yy - crease)) * inside_x, subject.skin * 0.6)

    if rng.random() < 0.25:  # occluder: hair strand or a glasses frame
        if rng.random() < 0.5:
            x0 = rng.uniform(0, w)
            slope = rng.uniform(-1.5, 1.5)
            stripe = _soft(rng.uniform(0.6, 2.0) - np.abs(xx - x0 - slope * (yy - h / 2)))
            _paint(img, stripe, rng.uniform(20, 90, 3))
        else:
            y0 = rng.uniform(0.05, 0.35) * h if rng.random() < 0.5 else rng.uniform(0.8, 0.98) * h
            _paint(img, _soft(rng.uniform(0.7, 1.8) - np.abs(yy - y0)), rng.uniform(10, 60, 3))

    if shifted:  # infrared-like: grey with a cast, flat and dark lighting, low resolution
        grey = img @ np.array([0.3, 0.59, 0.11], dtype=np.float32)
        cast = np.array([1.0, 0.92, 1.08], dtype=np.float32) * rng.uniform(0.9, 1.1, 3)
        img = grey[..., None] * cast
        img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** rng.uniform(1.2, 1.8)
        img = 0.65 * img + 0.35 * img.mean()
        img = _box_blur(img, int(rng.integers(1, 3)))
        img += rng.normal(0, rng.uniform(5, 14), img.shape)
        if hard:  # and heavy JPEG, as crops cut from a compressed video stream
            buffer = io.BytesIO()
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                buffer, "JPEG", quality=int(rng.integers(8, 30))
            )
            img = np.asarray(Image.open(buffer), dtype=np.float32).reshape(h, w, -1)[..., :3]
            img = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img
    else:
        if rng.random() < 0.3:
            img = _box_blur(img, 1)
        img += rng.normal(0, rng.uniform(1, 7), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


CHUNK_ROWS = 500  # rows rendered per task
IN_PROCESS_ROWS = 2000  # below this, starting worker processes costs more than it saves
SPLIT_SHARES = {"train": 0.8, "val": 0.1, "test": 0.1}


@dataclass
class Plan:
    """Everything about a synthetic dataset except the pixels: decided up front, cheaply, from the seed."""

    style: str
    seed: int
    subjects: list[Subject]
    labels: np.ndarray
    who: np.ndarray
    splits: np.ndarray | None
    given: np.ndarray | None = None  # the labels written, when some are wrong on purpose (--label_noise)


def plan(
    rows: int,
    seed: int,
    style: str,
    with_split: bool,
    subjects: int = 24,
    open_fraction: float = 0.5,
    label_noise: float = 0.0,
) -> Plan:
    if style not in STYLES:
        raise UserError(f"--style must be one of {', '.join(STYLES)}, got {style!r}")
    if rows < 1:
        raise UserError(f"--rows must be >= 1, got {rows}")
    rng = np.random.default_rng([seed, STYLES.index(style)])
    people = make_subjects(subjects, rng)
    labels = (rng.random(rows) < open_fraction).astype(np.int64)
    who = rng.integers(len(people), size=rows)
    names, shares = np.array(list(SPLIT_SHARES)), list(SPLIT_SHARES.values())
    splits = rng.choice(names, size=rows, p=shares) if with_split else None
    if not 0.0 <= label_noise < 0.5:
        raise UserError(f"--label_noise must be in [0, 0.5), got {label_noise}")
    given = None
    if label_noise:  # its own stream: the images are those of the same data without noise
        flips = np.random.default_rng([seed, STYLES.index(style), 2]).random(rows) < label_noise
        given = np.where(flips, 1 - labels, labels)
    return Plan(style, seed, people, labels, who, splits, given)


def render_chunk(task: tuple) -> list[bytes]:
    """PNG bytes of a run of rows. Every row draws from its own seeded stream (about 20 us to create,
    against about 1 ms to render), so the data is the same whatever --num_workers and --shards are."""
    seed, style, start, labels, who, subjects = task
    return [
        encode(render_eye(np.random.default_rng([seed, STYLES.index(style), 1, i]), bool(label), subjects[w], style))
        for i, label, w in zip(range(start, start + len(labels)), labels, who)
    ]


def _batch(spec: Plan, start: int, pngs: list[bytes], embed_bytes: bool, image_dir: Path) -> pa.RecordBatch:
    rows = range(start, start + len(pngs))
    paths = [f"images/{spec.style}_{i:06d}.png" for i in rows]
    if not embed_bytes:
        for rel, png in zip(paths, pngs):
            (image_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (image_dir / rel).write_bytes(png)
    columns = {} if spec.splits is None else {"split": pa.array(spec.splits[start : start + len(pngs)].tolist())}
    truth = spec.labels[start : start + len(pngs)]
    labels = truth if spec.given is None else spec.given[start : start + len(pngs)]
    columns.update(
        label=pa.array(["open" if v else "closed" for v in labels]),
        class_id=pa.array(labels, pa.int64()),
        image_path=pa.array(paths),
        source=pa.array([f"synth_{spec.style}_subject{w:03d}" for w in spec.who[start : start + len(pngs)]]),
        image_bytes=pa.array(pngs if embed_bytes else [None] * len(pngs), pa.binary()),
    )
    if spec.given is not None:  # the truth, in a column training never reads
        columns["true_class_id"] = pa.array(truth, pa.int64())
    return pa.RecordBatch.from_pydict(columns)


def write_synthetic(
    out: str | Path,
    rows: int,
    seed: int,
    style: str = "a",
    *,
    shards: int = 1,
    with_split: bool = True,
    embed_bytes: bool = True,
    num_workers: int = 0,
    **plan_options,
) -> list[Path]:
    """Write a synthetic dataset to the folder `out` (dataset.parquet, or part-NNN.parquet shards).

    Rendering runs in `num_workers` processes, chunk by chunk, and every chunk is appended to its
    shard as soon as it is rendered: memory holds a few chunks, never the dataset. Each file is
    written under a temporary name and renamed when complete. With `embed_bytes=False` the PNGs
    are written under `out/images` and referenced by relative path.
    """
    spec = plan(rows, seed, style, with_split, **plan_options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, rows, max(1, shards) + 1).astype(int)
    names = ["dataset.parquet"] if shards <= 1 else [f"part-{k:03d}.parquet" for k in range(shards)]
    chunks = []  # (shard, start, stop); chunks never straddle shards
    for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        cuts = sorted({*range(lo - lo % CHUNK_ROWS + CHUNK_ROWS, hi, CHUNK_ROWS), lo, hi})
        chunks += [(k, a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    tasks = ((seed, style, a, spec.labels[a:b], spec.who[a:b], spec.subjects) for _, a, b in chunks)
    bar = progress(total=rows, desc="synth", unit="img")
    writers: dict[int, tuple[pq.ParquetWriter, Path]] = {}
    try:
        for (shard, start, _), pngs in zip(chunks, _rendered(tasks, num_workers, rows)):
            batch = _batch(spec, start, pngs, embed_bytes, out)
            if shard not in writers:
                tmp = out / f"{TMP_PREFIX}{names[shard]}"
                writers[shard] = (pq.ParquetWriter(tmp, batch.schema), tmp)
            writers[shard][0].write_batch(batch)
            bar.update(len(pngs))
        paths = []
        for shard, (writer, tmp) in sorted(writers.items()):
            writer.close()
            paths.append(tmp.replace(out / names[shard]))
        return paths
    finally:
        bar.close()
        for writer, tmp in writers.values():
            writer.close()
            tmp.unlink(missing_ok=True)


def _rendered(tasks, num_workers: int, rows: int):
    """Rendered chunks in order, from worker processes when that pays off; at most 2 per worker in flight."""
    if num_workers <= 1 or rows < IN_PROCESS_ROWS:
        yield from map(render_chunk, tasks)
        return
    context = multiprocessing.get_context("spawn")  # fork after torch has threads can deadlock
    with ProcessPoolExecutor(num_workers, mp_context=context) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.submit(render_chunk, task))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
