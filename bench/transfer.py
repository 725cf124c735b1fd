"""Which fine-tuning wins on a shifted dataset B, measured: the table behind the defaults that `--pretrain`
implies. A benchmark, not a test.

    python bench/transfer.py                       # about 12 minutes on 2 CPU cores
    python bench/transfer.py --seeds 1,2,3 --base_channels 32 --json transfer.json

It synthesises dataset A (`ocec synth --style a`) and a shifted dataset B (`--style b`), trains model A on
A, then on B, at equal epochs and for every training seed, trains from scratch and fine-tunes from A with
each recipe and technique, in two regimes:
  labelled  only `--labelled` rows of B's train split carry labels (the rest are kept unlabelled)
  all       every train row of B is labelled
and, in the `labelled` regime, the pseudo-label path: the default fine-tune labels the unlabelled rows
(`ocec pseudo-label`), and a second fine-tune from A trains on the labelled rows plus those.
Scores are the best validation F1 (at threshold 0.5) of each run on B's validation split.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ocec.data.synth import write_synthetic  # noqa: E402
from ocec.finetune.pseudo import pseudo_label  # noqa: E402
from ocec.training.settings import FINETUNE_DEFAULTS  # noqa: E402
from ocec.training.trainer import train  # noqa: E402

# name -> the flags on top of `--pretrain A --epochs E` (None: from scratch). "default" is exactly what
# `--pretrain` alone gives (FINETUNE_DEFAULTS); the others change one thing each.
CONFIGS = {
    "scratch": None,
    "default": {},
    "lr 3e-4": {"lr": 3e-4},
    "no bn_adapt": {"bn_adapt": False},
    "warmup 3": {"warmup_epochs": 3.0},
    "ema 0.99": {"ema_decay": 0.99},
    "recipe lp-ft": {"recipe": "lp-ft"},
    "recipe surgical": {"recipe": "surgical"},
    "recipe progressive": {"recipe": "progressive"},
    "l2sp 0.01": {"l2sp": 0.01},
    "layer_decay 0.7": {"layer_decay": 0.7},
    "hard_mining 0.3": {"hard_mining": 0.3},
}


def make_data(workdir: Path, args) -> dict:
    """A, B, and B's two regimes: all rows labelled; `--labelled` train rows labelled, the rest unlabelled."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    paths = {"a": workdir / "a", "b": workdir / "b"}
    write_synthetic(paths["a"], args.rows_a, seed=args.data_seed, style="a", num_workers=2)
    write_synthetic(paths["b"], args.rows_b, seed=args.data_seed + 1, style="b", num_workers=2)
    table = pq.read_table(paths["b"] / "dataset.parquet")
    train_rows = np.flatnonzero(pc.equal(table.column("split"), "train").to_numpy(zero_copy_only=False))
    labelled = np.random.default_rng(args.data_seed).choice(
        train_rows, size=min(args.labelled, len(train_rows)), replace=False
    )
    unlabelled = np.setdiff1d(train_rows, labelled)
    keep = np.sort(np.concatenate([labelled, np.setdiff1d(np.arange(table.num_rows), train_rows)]))
    paths["b_labelled"] = workdir / "b_labelled"
    paths["b_labelled"].mkdir()
    pq.write_table(table.take(pa.array(keep)), paths["b_labelled"] / "dataset.parquet")
    paths["b_unlabelled"] = workdir / "b_unlabelled"
    paths["b_unlabelled"].mkdir()
    pq.write_table(
        table.take(pa.array(unlabelled)).drop_columns(["label", "class_id"]), paths["b_unlabelled"] / "dataset.parquet"
    )
    return {k: str(v) for k, v in paths.items()}


def run(settings: dict, out: Path) -> dict:
    tic = time.time()
    run_dir = train(**settings, output_dir=str(out))
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "best_f1": summary["best_f1"],
        "best_epoch": summary["best_epoch"],
        "seconds": round(time.time() - tic, 1),
        "run": str(run_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows_a", type=int, default=6000)
    parser.add_argument("--rows_b", type=int, default=6000)
    parser.add_argument("--labelled", type=int, default=1000, help="labelled train rows of B in the 'labelled' regime")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--seeds", default="1,2", help="training seeds (each run repeats per seed)")
    parser.add_argument("--data_seed", type=int, default=500, help="seed of the synthetic pair (the tests use others)")
    parser.add_argument("--base_channels", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="which rows of the table to run")
    parser.add_argument("--no_pseudo", action="store_true", help="leave out the pseudo-label path")
    parser.add_argument("--json", default="transfer.json")
    parser.add_argument("--workdir", help="keep data and runs here (default: a temporary folder, removed)")
    args = parser.parse_args()
    logging.getLogger("ocec").setLevel(logging.WARNING)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ocec-transfer-"))
    seeds = [int(s) for s in args.seeds.split(",")]
    tic = time.time()
    data = make_data(workdir, args)
    common = dict(
        image_size=(32, 64),
        base_channels=args.base_channels,
        batch_size=args.batch_size,
        num_workers=0,
        device="cpu",
        epochs=args.epochs,
        cache_dir=str(workdir / "cache"),
        keep_last=1,
        keep_best=1,
    )
    model_a = run({**common, "data_root": data["a"], "seed": 0}, workdir / "model_a")
    print(f"model A on A: val F1 {model_a['best_f1']:.4f} ({model_a['seconds']} s)", flush=True)
    finetune = {k: v for k, v in common.items() if k not in ("image_size", "base_channels")}
    results = {"model_a": model_a, "finetune_defaults": {k: str(v) for k, v in FINETUNE_DEFAULTS.items()}, "runs": {}}
    for regime, root in (("labelled", data["b_labelled"]), ("all", data["b"])):
        for name in args.configs.split(","):
            flags = CONFIGS[name]
            for seed in seeds:
                out = workdir / "runs" / regime / name.replace(" ", "_") / f"s{seed}"
                if flags is None:
                    settings = {**common, "data_root": root, "seed": seed}
                else:
                    settings = {**finetune, "data_root": root, "seed": seed, "pretrain": [model_a["run"]], **flags}
                result = run(settings, out)
                results["runs"].setdefault(regime, {}).setdefault(name, {})[seed] = result
                print(
                    f"{regime:>9} {name:<20} seed {seed}: {result['best_f1']:.4f} ({result['seconds']} s)", flush=True
                )
    if not args.no_pseudo:
        results["pseudo"] = {}
        for seed in seeds:
            first = results["runs"]["labelled"]["default"][seed]["run"]
            folder = workdir / "pseudo" / f"s{seed}"
            report = pseudo_label(
                [first],
                data["b_unlabelled"],
                str(folder),
                batch_size=1024,
                device="cpu",
                num_workers=0,
                cache_dir=workdir / "cache",
                max_bad_fraction=0.01,
            )
            settings = {**finetune, "data_root": data["b_labelled"], "seed": seed, "pretrain": [model_a["run"]]}
            settings["extra_train_root"] = str(folder)
            result = run(settings, workdir / "runs" / "pseudo" / f"s{seed}")
            results["pseudo"][seed] = {**result, "pseudo_rows": report["kept"], "pseudo_of": report["rows"]}
            print(
                f"   pseudo default + pseudo-labels seed {seed}: {result['best_f1']:.4f} ({report['kept']} rows)",
                flush=True,
            )
    results["seconds"] = round(time.time() - tic, 1)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print()
    print(report_table(results, seeds))
    print(f"\n{results['seconds']:.0f} s; numbers: {args.json}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def report_table(results: dict, seeds: list[int]) -> str:
    def mean(cell: dict) -> float:
        return statistics.mean(v["best_f1"] for v in cell.values())

    regimes = list(results["runs"])
    names = list(results["runs"][regimes[0]])
    header = f"{'':<22}" + "".join(f"{r + ' (mean)':>18}{'vs scratch':>12}{'seeds':>18}" for r in regimes)
    lines = [header]
    for name in names:
        line = f"{name:<22}"
        for regime in regimes:
            cell = results["runs"][regime].get(name)
            if not cell:
                line += f"{'':>48}"
                continue
            gap = (
                mean(cell) - mean(results["runs"][regime]["scratch"])
                if "scratch" in results["runs"][regime]
                else float("nan")
            )
            per_seed = " ".join(f"{cell[s]['best_f1']:.3f}" for s in seeds if s in cell)
            line += f"{mean(cell):>18.4f}{gap:>+12.4f}{per_seed:>18}"
        lines.append(line)
    if results.get("pseudo"):
        cell = results["pseudo"]
        base = mean(results["runs"]["labelled"]["default"])
        per_seed = " ".join(f"{cell[s]['best_f1']:.3f}" for s in seeds if s in cell)
        lines.append(
            f"{'default + pseudo':<22}{mean(cell):>18.4f}{mean(cell) - base:>+12.4f}{per_seed:>18}  (vs default)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
