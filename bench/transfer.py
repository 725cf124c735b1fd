"""Which fine-tuning wins on a shifted dataset B, measured on several shifts: the table behind the defaults
that `--pretrain` implies. A benchmark, not a test.

    python bench/transfer.py                       # about 10 minutes on 2 CPU cores
    python bench/transfer.py --cases b --configs scratch,default,"recipe lp-ft" --seeds 1,2,3

Model A is trained once on synthetic style a (`ocec synth --style a`). Each case is a dataset B:
  b     synthetic style b (infrared-like, blurred, more half-closed eyes), `--rows_b` rows
  c     synthetic style c, the hard regime (detector-crop size, heavy JPEG, ambiguous half-closed eyes),
        `--rows_c` rows
  real  real eye crops (`--real_eyes`, default ../shared/data/real_eyes.parquet beside the project: used by
        path, never copied), batch 64 (558 train rows)
and each synthetic case has two regimes:
  labelled  only `--labelled` rows of B's train split carry labels (the rest are kept unlabelled)
  all       every train row of B is labelled
On B, at equal epochs and for every training seed, it trains from scratch and fine-tunes from A with each
config; in the `labelled` regimes also the pseudo-label path: the default fine-tune labels the unlabelled
rows (`ocec pseudo-label`), and a second fine-tune from A trains on the labelled rows plus those.
Scores are the best validation F1 (at threshold 0.5) of each run on B's validation split. "noise" is the
larger seed range (max - min) of the two rows compared: a difference inside it is within seed noise.
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
    "augment none": {"augment": "none"},
    "augment light": {"augment": "light"},
    "augment default": {"augment": "default"},
    "augment shift": {"augment": "shift"},
}


def parse_with_outputs(parser: argparse.ArgumentParser, json_name: str, report_table) -> argparse.Namespace:
    """The flags every benchmark here shares: where its numbers and runs go, or an earlier run's JSON whose
    table `report_table(results, seeds)` prints (and stops). Quiets ocec's log: the benchmarks print."""
    parser.add_argument("--json", default=json_name)
    parser.add_argument("--workdir", help="keep data and runs here (default: a temporary folder, removed)")
    parser.add_argument("--table", metavar="JSON", help="print the table of an earlier run's JSON and stop")
    args = parser.parse_args()
    if args.table:
        print(report_table(json.loads(Path(args.table).read_text()), [int(s) for s in args.seeds.split(",")]))
        raise SystemExit(0)
    logging.getLogger("ocec").setLevel(logging.WARNING)
    return args


def split_labelled(root: Path, workdir: Path, labelled: int, seed: int, image_size, cache_dir: Path) -> dict:
    """B's two regimes: all rows labelled (as written); `labelled` train rows labelled, the rest unlabelled."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from ocec.data.dataset import image_hashes, load_dataset

    cache = {"cache_dir": cache_dir, "max_bad_fraction": 0.01}
    table = pq.read_table(root / "dataset.parquet")
    train_rows = np.flatnonzero(pc.equal(table.column("split"), "train").to_numpy(zero_copy_only=False))
    chosen = np.random.default_rng(seed).choice(train_rows, size=min(labelled, len(train_rows)), replace=False)
    # Style c's flattest tiny crops decode to the very pixels of a val/test image at the model's size (21 of
    # 12,783 train rows); training refuses such extra rows (the best checkpoint would be chosen on images it
    # trained on), so they are not offered as unlabelled rows.
    decoded = load_dataset(root, image_size, ratios=(0.8, 0.1, 0.1), seed=0, num_workers=0, **cache)
    held_out = {h for name in ("val", "test") for h in image_hashes(decoded.splits[name])}
    seen = dict(zip(decoded.splits["train"].rows.tolist(), image_hashes(decoded.splits["train"])))
    unlabelled = np.array([i for i in np.setdiff1d(train_rows, chosen) if seen[i] not in held_out], dtype=np.int64)
    keep = np.sort(np.concatenate([chosen, np.setdiff1d(np.arange(table.num_rows), train_rows)]))
    paths = {"all": root, "labelled": workdir / "labelled", "unlabelled": workdir / "unlabelled"}
    for name, rows, drop in (("labelled", keep, []), ("unlabelled", unlabelled, ["label", "class_id"])):
        paths[name].mkdir(parents=True)
        pq.write_table(table.take(pa.array(rows)).drop_columns(drop), paths[name] / "dataset.parquet")
    return {k: str(v) for k, v in paths.items()}


def make_cases(workdir: Path, args) -> dict:
    """case -> {regime: data root, 'unlabelled': root of the labelled regime's unlabelled rows}."""
    cases = {}
    for case in args.cases.split(","):
        if case == "real":
            if not Path(args.real_eyes).is_file():
                print(f"case real: {args.real_eyes} not found; left out (--real_eyes PATH)", flush=True)
                continue
            cases[case] = {"all": args.real_eyes}
            continue
        if case not in ("b", "c"):
            raise SystemExit(f"--cases: {case!r} is not one of b, c, real")
        root = workdir / case / "all"
        rows = args.rows_b if case == "b" else args.rows_c
        # each case's own seed, whichever cases run with it
        write_synthetic(root, rows, seed=args.data_seed + "bc".index(case) + 1, style=case, num_workers=2)
        cases[case] = split_labelled(root, workdir / case, args.labelled, args.data_seed, (32, 64), workdir / "cache")
    return cases


def run(settings: dict, out: Path) -> dict:
    tic = time.time()
    run_dir = train(**settings, output_dir=str(out))
    summary = json.loads((run_dir / "summary.json").read_text())
    result = {
        "best_f1": summary["best_f1"],
        "best_epoch": summary["best_epoch"],
        "seconds": round(time.time() - tic, 1),
        "run": str(run_dir),
    }
    zero_shot = (summary.get("pretrain") or {}).get("zero_shot")
    if zero_shot:  # model A on B before the first step, and the regime the log named
        result["zero_shot"] = zero_shot
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="b,c,real", help="datasets B: b, c (synthetic styles), real (eye crops)")
    parser.add_argument("--rows_a", type=int, default=6000)
    parser.add_argument("--rows_b", type=int, default=6000)
    parser.add_argument("--rows_c", type=int, default=16000)
    parser.add_argument("--real_eyes", default=str(ROOT.parent / "shared" / "data" / "real_eyes.parquet"))
    parser.add_argument("--labelled", type=int, default=1000, help="labelled train rows of B in the 'labelled' regime")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--seeds", default="1,2", help="training seeds (each run repeats per seed)")
    parser.add_argument("--data_seed", type=int, default=500, help="seed of the synthetic data (the tests use others)")
    parser.add_argument("--base_channels", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=256, help="synthetic cases; the real case uses 64")
    parser.add_argument(
        "--configs", default="scratch,default,augment default", help=f"rows of the table, from: {', '.join(CONFIGS)}"
    )
    parser.add_argument("--no_pseudo", action="store_true", help="leave out the pseudo-label path")
    args = parse_with_outputs(parser, "transfer.json", report_table)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ocec-transfer-"))
    seeds = [int(s) for s in args.seeds.split(",")]
    tic = time.time()
    data_a = workdir / "a"
    write_synthetic(data_a, args.rows_a, seed=args.data_seed, style="a", num_workers=2)
    cases = make_cases(workdir, args)
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
    model_a = run({**common, "data_root": str(data_a), "seed": 0}, workdir / "model_a")
    print(f"model A on A: val F1 {model_a['best_f1']:.4f} ({model_a['seconds']} s)", flush=True)
    finetune = {k: v for k, v in common.items() if k not in ("image_size", "base_channels")}
    results = {"model_a": model_a, "finetune_defaults": {k: str(v) for k, v in FINETUNE_DEFAULTS.items()}, "runs": {}}
    results["pseudo"] = {}
    for case, roots in cases.items():
        batch = {"batch_size": 64} if case == "real" else {}
        for regime in ("labelled", "all"):
            if regime not in roots:
                continue
            column = f"{case} {regime}"
            for name in args.configs.split(","):
                flags = CONFIGS[name]
                for seed in seeds:
                    out = workdir / "runs" / case / regime / name.replace(" ", "_") / f"s{seed}"
                    if flags is None:
                        settings = {**common, **batch, "data_root": roots[regime], "seed": seed}
                    else:
                        settings = {**finetune, **batch, "data_root": roots[regime], "seed": seed}
                        settings.update(pretrain=[model_a["run"]], **flags)
                    result = run(settings, out)
                    results["runs"].setdefault(column, {}).setdefault(name, {})[seed] = result
                    print(f"{column:>12} {name:<20} seed {seed}: {result['best_f1']:.4f} ({result['seconds']} s)")
            if regime == "labelled" and not args.no_pseudo and "default" in results["runs"][column]:
                results["pseudo"][column] = pseudo_rows(
                    results["runs"][column]["default"], roots, finetune, model_a, workdir / "pseudo" / case, seeds
                )
    results["seconds"] = round(time.time() - tic, 1)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print()
    print(report_table(results, seeds))
    print(f"\n{results['seconds']:.0f} s; numbers: {args.json}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def pseudo_rows(first_runs: dict, roots: dict, finetune: dict, model_a: dict, folder: Path, seeds) -> dict:
    """Per seed: the default fine-tune labels the unlabelled rows, and a second fine-tune from A trains on
    the labelled rows plus those."""
    cell = {}
    for seed in seeds:
        labels = folder / f"labels_s{seed}"
        report = pseudo_label(
            [first_runs[seed]["run"]],
            roots["unlabelled"],
            str(labels),
            batch_size=1024,
            device="cpu",
            num_workers=0,
            cache_dir=Path(finetune["cache_dir"]),
            max_bad_fraction=0.01,
        )
        settings = {**finetune, "data_root": roots["labelled"], "seed": seed, "pretrain": [model_a["run"]]}
        result = run({**settings, "extra_train_root": str(labels)}, folder / f"s{seed}")
        cell[seed] = {**result, "pseudo_rows": report["kept"], "pseudo_of": report["rows"]}
        print(f"{'':>12} default + pseudo-labels seed {seed}: {result['best_f1']:.4f} ({report['kept']} rows)")
    return cell


def report_table(results: dict, seeds: list[int]) -> str:
    """A markdown table, a row per case and regime: A's zero-shot ROC-AUC on B (after BatchNorm adaptation),
    then each config's mean best val F1 with its seeds, and its difference to scratch (pseudo-labels: to the
    default fine-tune) judged against the seed noise."""

    def scores(cell: dict) -> list[float]:
        return [cell[str(s)]["best_f1"] if str(s) in cell else cell[s]["best_f1"] for s in seeds]

    def compare(cell: dict | None, base: dict | None) -> str:
        if not cell:
            return " |"
        mean = statistics.mean(scores(cell))
        text = f" {mean:.4f} ({' / '.join(f'{v:.4f}' for v in scores(cell))})"
        if base is None:
            return text + " |"
        noise = max(max(scores(c)) - min(scores(c)) for c in (cell, base))
        gap = mean - statistics.mean(scores(base))
        verdict = "within noise" if abs(gap) <= noise else ("gain" if gap > 0 else "LOSS")
        return text + f", {gap:+.4f} {verdict} |"

    names = list(dict.fromkeys(n for cells in results["runs"].values() for n in cells))
    header = ["case", "A's zero-shot AUC", *[n if n == "scratch" else f"{n} (vs scratch)" for n in names]]
    if results.get("pseudo"):
        header.append("default + pseudo-labels (vs default)")
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for column, cells in results["runs"].items():
        first = next(iter(cells.get("default", {}).values()), {})
        auc = (first.get("zero_shot") or {}).get("after_bn_adapt", {}).get("roc_auc")
        line = f"| {column} | {'' if auc is None else f'{auc:.3f}'} |"
        for name in names:
            line += compare(cells.get(name), None if name == "scratch" else cells.get("scratch"))
        if results.get("pseudo"):
            line += compare(results["pseudo"].get(column), cells.get("default"))
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
