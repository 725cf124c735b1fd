"""How many training images precise BN needs before validation, measured: the table behind `--precise_bn`'s
default. A benchmark, not a test.

    python bench/precise_bn.py                     # about 6 minutes on 2 CPU cores
    python bench/precise_bn.py --real ../shared/data/real_eyes.parquet --seeds 1,2

For each dataset (synthetic style a, the shifted style b, and real eye crops when given) and seed, it trains
2 epochs with default flags and precise BN off, then re-estimates the BatchNorm statistics of the epoch-1 and
epoch-2 checkpoints on N seeded training images and reports val F1 at 0.5, the best-threshold F1 and ROC-AUC
for each N (0: the running statistics training left). The cost column is the re-estimation time as a share of
that run's epoch time (training + validation), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ocec.data.augment import augment_batch  # noqa: E402
from ocec.data.dataset import load_dataset  # noqa: E402
from ocec.data.synth import write_synthetic  # noqa: E402
from ocec.engine.batchnorm import adapt_batchnorm  # noqa: E402
from ocec.engine.inference import evaluate_split  # noqa: E402
from ocec.finetune.pretrained import load_for_inference  # noqa: E402
from ocec.training.trainer import train  # noqa: E402

SIZES = (0, 256, 512, 1000, 2000, 4000)


def measure(data_root: Path, out: Path, seed: int, args) -> list[dict]:
    run = train(
        data_root=str(data_root),
        output_dir=str(out),
        epochs=2,
        seed=seed,
        precise_bn=0,
        num_workers=0,
        device="cpu",
        batch_size=args.batch_size,
        keep_last=2,
    )
    epoch_seconds = statistics.mean(r["wall_seconds"] for r in json.loads((run / "history.json").read_text()))
    rows = []
    for epoch in (1, 2):
        path = run / f"ocec_epoch_{epoch:04d}.pt"
        model, snap, _ = load_for_inference([str(path)], torch.device("cpu"))
        data = load_dataset(
            data_root,
            snap.model_config.image_size,
            ratios=(0.8, 0.1, 0.1),
            seed=seed,
            num_workers=0,
            cache_dir=None,
            max_bad_fraction=0.01,
        )
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for size in SIZES:
            model.load_state_dict(state)
            started = time.perf_counter()
            if size:
                gen = torch.Generator().manual_seed(seed)
                adapt_batchnorm(
                    model,
                    data.get("train"),
                    batch_size=args.batch_size,
                    device=torch.device("cpu"),
                    max_images=size,
                    seed=seed,
                    transform=None if args.augment == "none" else lambda x, g=gen: augment_batch(x, args.augment, g),
                )
            seconds = time.perf_counter() - started
            model.eval()
            report, _ = evaluate_split(model, data.get("val"), batch_size=512, device=torch.device("cpu"))
            rows.append(
                {
                    "data": data_root.name,
                    "seed": seed,
                    "epoch": epoch,
                    "requested": size,
                    "images": min(size, len(data.get("train"))),
                    "f1": report["f1"],
                    "best_f1": report["best_f1"],
                    "auc": report["roc_auc"],
                    "cost": seconds / epoch_seconds,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=6000, help="rows of each synthetic dataset (80%% train)")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--real", help="a real dataset to measure too, e.g. ../shared/data/real_eyes.parquet")
    parser.add_argument("--json", default="precise_bn.json")
    parser.add_argument(
        "--augment",
        default="none",
        choices=("none", "light", "default"),
        help="augment the re-estimation images (the trainer uses its --augment, 'default'); none: plain images",
    )
    args = parser.parse_args()
    logging.getLogger("ocec").setLevel(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        datasets = []
        for style, data_seed in (("a", 700), ("b", 701)):
            folder = tmp / f"synth_{style}"
            write_synthetic(folder, args.rows, seed=data_seed, style=style)
            datasets.append(folder)
        if args.real:
            datasets.append(Path(args.real).resolve())
        for data_root in datasets:
            for seed in [int(s) for s in args.seeds.split(",")]:
                rows += measure(data_root, tmp / f"run_{data_root.stem}_{seed}", seed, args)
                print(f"done: {data_root.name} seed {seed}", file=sys.stderr)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    print("| data | epoch | images | val F1 at 0.5 (seeds) | best-threshold F1 | ROC-AUC | cost (x epoch) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    keys = sorted({(r["data"], r["epoch"], r["requested"]) for r in rows})
    for data, epoch, requested in keys:
        group = [r for r in rows if (r["data"], r["epoch"], r["requested"]) == (data, epoch, requested)]
        images = group[0]["images"]
        f1 = " / ".join(f"{r['f1']:.3f}" for r in group)
        best = " / ".join(f"{r['best_f1']:.3f}" for r in group)
        auc = " / ".join(f"{r['auc']:.3f}" for r in group)
        cost = statistics.mean(r["cost"] for r in group)
        print(f"| {data} | {epoch} | {images} | {f1} | {best} | {auc} | {cost:.3f} |")


if __name__ == "__main__":
    main()
