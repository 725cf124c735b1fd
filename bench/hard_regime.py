"""The hard regime, measured: many labels on a hard dataset B (`ocec synth --style c`), where the tiny model's
capacity is the limit. A benchmark, not a test.

    python bench/hard_regime.py                    # about 50 minutes on 2 CPU cores
    python bench/hard_regime.py --seeds 1,2,3 --epochs 32 --json hard_regime.json

It synthesises dataset A (style a) and B (style c), trains model A on A and a teacher on B (base 64, 6
blocks, at 16x32: a quarter of the student's pixels, enough for 7-13 px crops), then for each seed (every
run, A and the teacher too, on one schedule: --epochs, --plateau_patience):

  scratch             the student from scratch
  fine-tune           `--pretrain A` (its defaults)
  + teacher           `--pretrain A --teacher T` (the defaults --kd_alpha / --kd_temperature)
  + teacher, blended  the same with `--kd_mixup 0.5` (function matching: the teacher labels blends of images)
  augment X           `--pretrain A --augment X` for each preset other than the fine-tuning default

and, over every run fine-tuned from A (each row but scratch, each seed): a uniform and a greedy soup (`ocec
soup`), and WiSE-FT between A and the first seed's fine-tune. Each run is scored twice at threshold 0.5: its
best val F1 (the epoch val chose) and that checkpoint's F1 on B's test split, which no choice has seen;
soups are judged on the test split against the mean of their ingredients there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transfer import parse_with_outputs, run  # noqa: E402

from ocec.api import evaluate  # noqa: E402
from ocec.core.config import AUGMENT_LEVELS, TrainConfig  # noqa: E402
from ocec.data.synth import write_synthetic  # noqa: E402
from ocec.tools.soup import make_soup  # noqa: E402
from ocec.training.settings import FINETUNE_DEFAULTS  # noqa: E402

TEACHER = {"base_channels": 64, "num_blocks": 6, "image_size": (16, 32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows_a", type=int, default=6000)
    parser.add_argument("--rows", type=int, default=16000, help="rows of B (style c); 80%% of them train")
    parser.add_argument("--epochs", type=int, default=48, help="every run: A, the teacher, each student")
    parser.add_argument(
        "--plateau_patience",
        type=int,
        default=6,
        help="every run; the scratch default (2) halves the LR every third epoch from about epoch 12, which stops "
        "a 48-epoch run at about epoch 27 (docs/finetune.md recommends 5 or more for long fine-tunes)",
    )
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--data_seed", type=int, default=700)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--kd_alpha", type=float, default=TrainConfig.kd_alpha)
    parser.add_argument("--kd_temperature", type=float, default=TrainConfig.kd_temperature)
    parser.add_argument("--kd_mixup", type=float, default=0.5, help="of the blended row")
    parser.add_argument("--no_augment", action="store_true", help="leave out the augmentation rows")
    args = parse_with_outputs(parser, "hard_regime.json", report_table)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ocec-hard-"))
    seeds = [int(s) for s in args.seeds.split(",")]
    tic = time.time()
    data_a, data_b = workdir / "a", workdir / "b"
    write_synthetic(data_a, args.rows_a, seed=args.data_seed, style="a", num_workers=2)
    write_synthetic(data_b, args.rows, seed=args.data_seed + 1, style="c", num_workers=2)
    common = dict(
        batch_size=args.batch_size,
        num_workers=0,
        device="cpu",
        cache_dir=str(workdir / "cache"),
        keep_last=1,
        keep_best=1,
        epochs=args.epochs,
        plateau_patience=args.plateau_patience,
    )
    student = {**common, "image_size": (32, 64), "base_channels": 16}
    model_a = run({**student, "data_root": str(data_a), "seed": 0}, workdir / "model_a")
    print(f"model A on A: val F1 {model_a['best_f1']:.4f} ({model_a['seconds']} s)", flush=True)
    teacher = run({**common, **TEACHER, "data_root": str(data_b), "seed": 0}, workdir / "teacher")
    teacher = with_test_f1(teacher, data_b, common["cache_dir"])
    print(f"teacher on B: val F1 {teacher['best_f1']:.4f}, test {teacher['test_f1']:.4f} ({teacher['seconds']} s)")

    finetune = {**common, "data_root": str(data_b), "pretrain": [model_a["run"]]}
    distil = {"teacher": [teacher["run"]], "kd_alpha": args.kd_alpha, "kd_temperature": args.kd_temperature}
    rows = {
        "scratch": {**student, "data_root": str(data_b)},
        "fine-tune": finetune,
        "fine-tune + teacher": {**finetune, **distil},
        "fine-tune + teacher, blended": {**finetune, **distil, "kd_mixup": args.kd_mixup},
    }
    if not args.no_augment:
        for level in AUGMENT_LEVELS:
            if level != FINETUNE_DEFAULTS["augment"]:
                rows[f"fine-tune, augment {level}"] = {**finetune, "augment": level}
    results = {"model_a": model_a, "teacher": teacher, "runs": {}, "args": vars(args)}
    for name, settings in rows.items():
        for seed in seeds:
            out = workdir / "runs" / name.replace(" ", "_").replace(",", "").replace("+", "kd") / f"s{seed}"
            result = with_test_f1(run({**settings, "seed": seed}, out), data_b, common["cache_dir"])
            results["runs"].setdefault(name, {})[seed] = result
            scores = f"val {result['best_f1']:.4f} test {result['test_f1']:.4f}"
            print(f"{name:<28} seed {seed}: {scores} ({result['seconds']} s)", flush=True)

    results["soups"] = make_soups(results, seeds, data_a, data_b, workdir)
    results["seconds"] = round(time.time() - tic, 1)
    Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print()
    print(report_table(results, seeds))
    print(f"\n{results['seconds']:.0f} s; numbers: {args.json}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


def make_soups(results: dict, seeds: list[int], data_a: Path, data_b: Path, workdir: Path) -> dict:
    """Uniform and greedy soups of every run fine-tuned from A (each row but scratch, each seed), and WiSE-FT
    between A and the first seed's plain fine-tune."""
    tuned = [cells[s]["run"] for name, cells in results["runs"].items() if name != "scratch" for s in seeds]
    soups = {}
    for method in ("uniform", "greedy"):
        out = workdir / f"soup_{method}"
        soups[method] = make_soup(tuned, data_root=str(data_b), output_dir=str(out), method=method, device="cpu")
    soups["wise_ft"] = make_soup(
        [results["runs"]["fine-tune"][seeds[0]]["run"]],
        data_root=str(data_b),
        output_dir=str(workdir / "wise_ft"),
        wise_ft=results["model_a"]["run"],
        data_root_a=str(data_a),
        device="cpu",
    )
    return soups


def with_test_f1(result: dict, data_root: Path, cache_dir: str) -> dict:
    """The run's best (val-selected) checkpoint on B's test split at threshold 0.5: the best val F1 of a run
    is the luckiest of its epochs on the split that chose it, and the more a run's val F1 swings from epoch
    to epoch, the more it flatters it; the test split judges every run's choice on images none of them saw."""
    report = evaluate(result["run"], data_root, split="test", device="cpu", cache_dir=cache_dir)
    return {**result, "test_f1": report["overall"]["f1"], "test_roc_auc": report["overall"]["roc_auc"]}


def report_table(results: dict, seeds: list[int]) -> str:
    """A markdown table: each run's best val F1 and its checkpoint's test F1, per seed and their mean, against
    the plain fine-tune; the share of the fine-tune-to-teacher gap the teacher closes; the soups on test."""
    runs = {name: {int(k): v for k, v in cells.items()} for name, cells in results["runs"].items()}

    def mean(name: str, key: str) -> float:
        return statistics.mean(runs[name][s][key] for s in seeds)

    def cells(name: str, key: str) -> str:
        per_seed = " / ".join(f"{runs[name][s][key]:.4f}" for s in seeds)
        gap = mean(name, key) - mean("fine-tune", key)
        return f"{mean(name, key):.4f} ({per_seed}), {gap:+.4f}"

    teacher = results["teacher"]
    lines = [
        "| run | val F1 (best epoch): mean (seeds), vs fine-tune | test F1 of that checkpoint: mean (seeds), vs "
        "fine-tune |",
        "|---|---|---|",
        f"| teacher (scratch, base 64, 6 blocks, 16x32) | {teacher['best_f1']:.4f} | {teacher['test_f1']:.4f} |",
    ]
    lines += [f"| {name} | {cells(name, 'best_f1')} | {cells(name, 'test_f1')} |" for name in runs]
    for name in (n for n in runs if n.startswith("fine-tune + teacher")):
        share = []
        for key, top in (("best_f1", teacher["best_f1"]), ("test_f1", teacher["test_f1"])):
            gain, gap = mean(name, key) - mean("fine-tune", key), top - mean("fine-tune", key)
            share.append(f"{gain:+.4f} of {gap:+.4f} ({gain / gap:.0%})" if gap > 0 else f"{gain:+.4f} (no gap)")
        lines.append(f"| fine-tune-to-teacher gap closed by {name[len('fine-tune + ') :]} | {share[0]} | {share[1]} |")
    soups = results.get("soups", {})
    for method in ("uniform", "greedy"):
        if method in soups:
            s = soups[method]
            lines.append(
                f"| {method} soup of {len(s['ingredients'])} fine-tunes from A ({len(s['kept'])} kept) | "
                f"{s['val_f1']:.4f} | {s['test_f1']:.4f} (ingredients' mean {s['ingredients_mean_test_f1']:.4f}, "
                f"{s['test_f1'] - s['ingredients_mean_test_f1']:+.4f}) |"
            )
    if "wise_ft" in soups:
        s = soups["wise_ft"]
        lines.append(
            f"| WiSE-FT, A to the seed-{seeds[0]} fine-tune: best alpha {s['alpha']:.1f} | {s['val_f1']:.4f} | "
            f"{s['test_f1']:.4f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
