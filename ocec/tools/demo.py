"""`python -m ocec demo`: the fine-tuning story end to end on synthetic data, in a few minutes on a CPU.

1. synthesise dataset A (style a) and a smaller, shifted dataset B (style b);
2. train model A on A;
3. on B, train from scratch and fine-tune from A's best checkpoint with the same epoch budget;
4. print a side-by-side table.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..data.synth import write_synthetic
from ..training.trainer import train

log = logging.getLogger("ocec")


def _dataset(out: Path, style: str, rows: int, seed: int) -> Path:
    folder = out / f"data_{style}_{rows}_s{seed}"
    if not (folder / "dataset.parquet").is_file():
        log.info("synthesising %d style-%s images into %s", rows, style, folder)
        write_synthetic(folder, rows, seed, style)
    return folder


def run_demo(
    out: str | Path = "runs/demo",
    *,
    rows_a: int = 3000,
    rows_b: int = 1200,
    epochs_a: int = 6,
    epochs_b: int = 4,
    seed: int = 0,
    device: str = "auto",
    num_workers: int = 0,
    base_channels: int = 16,
) -> list[dict]:
    out = Path(out)
    data_a = _dataset(out, "a", rows_a, seed)
    data_b = _dataset(out, "b", rows_b, seed + 1)
    common = dict(
        base_channels=base_channels,
        num_blocks=4,
        image_size=(32, 64),
        margin_method="cosface",
        batch_size=64,
        num_workers=num_workers,
        seed=seed,
        device=device,
        warmup_epochs=1,
        cache_dir=str(out / "cache"),
        keep_last=2,
        keep_best=2,
    )
    rows = []

    def timed(label, **settings):
        tic = time.time()
        run_dir = train(**settings)
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append(
            {
                "run": label,
                "best_val_f1": summary["best_f1"],
                "best_epoch": summary["best_epoch"],
                "epochs": summary["epochs_completed"],
                "seconds": round(time.time() - tic, 1),
                "run_dir": str(run_dir),
            }
        )
        return run_dir

    log.info("== 1/3 model A: from scratch on dataset A")
    run_a = timed(
        "model A (on A)", data_root=str(data_a), output_dir=str(out / "model_a"), epochs=epochs_a, lr=2e-3, **common
    )
    log.info("== 2/3 dataset B from scratch")
    timed(
        "B from scratch", data_root=str(data_b), output_dir=str(out / "scratch_b"), epochs=epochs_b, lr=2e-3, **common
    )
    log.info("== 3/3 dataset B fine-tuned from model A")
    timed(
        "B fine-tuned from A",
        data_root=str(data_b),
        output_dir=str(out / "finetune_b"),
        epochs=epochs_b,
        lr=1e-3,
        pretrain=[str(run_a)],
        extra_val_root=str(data_a),
        **common,
    )
    print()
    print(format_table(rows))
    print(f"\ncompare them: python -m ocec compare {' '.join(r['run_dir'] for r in rows)} --data_root {data_b}")
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'run':<22} {'best val F1':>11} {'at epoch':>9} {'epochs':>7} {'seconds':>8}  run folder"
    lines = [header, "-" * len(header)]
    for r in rows:
        f1 = "n/a" if r["best_val_f1"] is None else f"{r['best_val_f1']:.4f}"
        lines.append(
            f"{r['run']:<22} {f1:>11} {r['best_epoch'] or '-':>9} {r['epochs']:>7} {r['seconds']:>8}  {r['run_dir']}"
        )
    return "\n".join(lines)
