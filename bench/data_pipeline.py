"""Data pipeline benchmark: can the data keep up with the model?

Measures, in one run and on the same synthetic parquet data:
  baseline  the upstream trainer's design: rows read one by one (as pandas iterrows does), every PNG
            decoded with PIL and augmented with torchvision transforms per sample, in every epoch,
            through a DataLoader with worker processes;
  ocec      decode once into uint8 (one-time cost, then cached), then per epoch: a seeded permutation,
            uint8 gather, float conversion and batched augmentation on the training device;
  model     a training step of the users' architecture (baseline, 32 channels, 4 blocks, cosface).

Prints images/s for each and the ratios ocec / baseline and data / model (how many times faster than the
model the data arrives: above 1 the data never limits training). GPU columns are filled when CUDA is
available. Usage: python bench/data_pipeline.py [--rows 4000] [--batch_size 256] [--workers 2]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from PIL import Image
from torchvision import transforms

from ocec.augment import augment_batch
from ocec.config import ModelConfig
from ocec.data import decode_all, read_table
from ocec.model import build_model
from ocec.synth import write_synthetic
from ocec.sampling import epoch_order, to_float

SIZE = (32, 64)


class PerSampleDataset(torch.utils.data.Dataset):
    """The upstream design: Python per row, PIL decode and per-sample transforms in every epoch."""

    def __init__(self, parquet: Path):
        table = pq.read_table(parquet)
        self.rows = table.to_pylist()  # one dict per row, like iterrows
        self.transform = transforms.Compose(
            [
                transforms.Resize(SIZE),
                transforms.RandomHorizontalFlip(),
                transforms.ColorJitter(0.25, 0.25, 0.25),
                transforms.RandomAffine(0, translate=(0.06, 0.06), scale=(0.92, 1.08)),
                transforms.ToTensor(),
            ]
        )

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        image = Image.open(io.BytesIO(row["image_bytes"])).convert("RGB")
        return self.transform(image), row["class_id"]


def images_per_second(fn, images: int, repeats: int = 2) -> float:
    fn()  # warm-up (worker start, allocator, caches)
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tic)
    return images / best


def bench_baseline(parquet: Path, batch_size: int, workers: int) -> float:
    dataset = PerSampleDataset(parquet)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )

    def epoch():
        for _batch in loader:
            pass

    return images_per_second(epoch, len(dataset))


def bench_ocec(images: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device) -> float:
    pool = images.to(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def epoch():
        order = epoch_order(labels, None, 0.0, False, torch.Generator().manual_seed(0)).to(device)
        for start in range(0, len(order), batch_size):
            x = augment_batch(to_float(pool[order[start : start + batch_size]], device), "default", gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return x

    return images_per_second(epoch, len(labels))


def bench_model(batch_size: int, device: torch.device, steps: int = 10) -> float:
    model = build_model(ModelConfig(image_size=SIZE)).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.rand(batch_size, 3, *SIZE, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.arange(batch_size, device=device) % 2

    def run():
        for _ in range(steps):
            loss, _ = model.margin_head.training_loss(model.embed(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return images_per_second(run, steps * batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the baseline")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(tmp, args.rows, seed=0, style="a")
        parquet = Path(tmp) / "dataset.parquet"
        tic = time.perf_counter()
        images, bad = decode_all(read_table(parquet), SIZE, num_workers=0)
        decode_once = time.perf_counter() - tic
        labels = torch.from_numpy(read_table(parquet).labels)
        images = torch.from_numpy(images)
        baseline = bench_baseline(parquet, args.batch_size, args.workers)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    results = {
        d.type: (bench_ocec(images, labels, args.batch_size, d), bench_model(args.batch_size, d)) for d in devices
    }

    print(f"{args.rows} images {SIZE[0]}x{SIZE[1]}, batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    print(
        f"one-time decode (ocec, 1 process): {decode_once:.2f} s = {args.rows / decode_once:,.0f} img/s, "
        f"then cached; uint8 storage {images.numel() / len(images) / 1024:.1f} KiB/image "
        f"(float32 would be x4)"
    )
    header = f"{'':28}{'CPU':>14}{'GPU':>14}"
    print(header)
    print("-" * len(header))

    def row(name, values):
        cells = "".join(f"{v:>14}" for v in values)
        print(f"{name:28}{cells}")

    fmt = lambda v: f"{v:,.0f}"
    cpu, gpu = results["cpu"], results.get("cuda")
    row(f"baseline data ({args.workers} workers) img/s", [fmt(baseline), "n/a"])
    row("ocec data img/s", [fmt(cpu[0]), fmt(gpu[0]) if gpu else "n/a (no GPU)"])
    row("model train step img/s", [fmt(cpu[1]), fmt(gpu[1]) if gpu else "n/a (no GPU)"])
    row("ratio ocec / baseline data", [f"{cpu[0] / baseline:.1f}x", f"{gpu[0] / baseline:.1f}x" if gpu else "n/a"])
    row("ratio ocec data / model", [f"{cpu[0] / cpu[1]:.1f}x", f"{gpu[0] / gpu[1]:.1f}x" if gpu else "n/a"])
    row("ratio baseline data / model", [f"{baseline / cpu[1]:.1f}x", f"{baseline / gpu[1]:.2f}x" if gpu else "n/a"])


if __name__ == "__main__":
    main()
