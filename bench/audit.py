"""How well `ocec audit` finds wrong labels, and what removing them is worth. A benchmark, not a test.

    python bench/audit.py                          # 5%, 10%, 20% flipped labels; about 25 minutes on 2 CPU cores
    python bench/audit.py --noise 0.1 --seeds 1

For each share of flipped labels: synthetic crops (`ocec synth --label_noise F`, the truth in a column
training never reads) are audited (K folds); the flagged rows are scored against the truth (precision,
recall). Then, per seed, one run trains on the noisy labels and one with `--exclude label_issues.csv`, and
both best checkpoints are evaluated on the val split with its correct labels.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def ocec(*args) -> str:
    done = subprocess.run([sys.executable, "-m", "ocec", *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"ocec {args[0]} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def clean_copy(noisy: Path, clean: Path) -> None:
    """The same rows with their true labels (for scoring only)."""
    table = pq.read_table(noisy / "dataset.parquet")
    truth = table.column("true_class_id")
    table = table.set_column(table.schema.get_field_index("class_id"), "class_id", truth)
    labels = pa.array(["open" if v else "closed" for v in truth.to_pylist()])
    table = table.set_column(table.schema.get_field_index("label"), "label", labels)
    clean.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, clean / "dataset.parquet")


def clean_val_f1(run: Path, clean: Path) -> float:
    report = run.parent / f"{run.name}_clean_val.json"
    ocec("eval", "--checkpoint", run, "--data_root", clean, "--split", "val", "--json", report)
    return json.loads(report.read_text())["overall"]["f1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--noise", default="0.05,0.1,0.2", help="shares of flipped labels")
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", default="1,2", help="training seeds of the noisy-vs-excluded comparison")
    parser.add_argument("--style", default="b", help="synthetic style (b: the shifted, harder one)")
    parser.add_argument("--workdir", help="keep data and runs here (default: a temporary folder)")
    parser.add_argument("--json", default="audit.json")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ocec-audit-"))
    model = ["--image_size", "16x32", "--base_channels", 16, "--num_workers", 0, "--device", "cpu"]
    train = ["--epochs", args.epochs, "--batch_size", 128, *model]
    results = []
    for noise in [float(v) for v in args.noise.split(",")]:
        case = work / f"noise_{noise:g}"
        noisy, clean = case / "noisy", case / "clean"
        if not (noisy / "dataset.parquet").exists():
            ocec(
                "synth", "--out", noisy, "--rows", args.rows, "--style", args.style, "--seed", 7, "--label_noise", noise
            )
        clean_copy(noisy, clean)
        ocec("audit", "--data_root", noisy, "--output_dir", case / "audit", "--folds", args.folds, *train)
        table = pq.read_table(noisy / "dataset.parquet", columns=["image_path", "class_id", "true_class_id"])
        wrong = {r["image_path"] for r in table.to_pylist() if r["class_id"] != r["true_class_id"]}
        flagged = [r["image_path"] for r in csv.DictReader((case / "audit" / "label_issues.csv").open())]
        hits = len(set(flagged) & wrong)
        row = {
            "noise": noise,
            "wrong": len(wrong),
            "flagged": len(flagged),
            "precision": hits / max(1, len(flagged)),
            "recall": hits / max(1, len(wrong)),
            "runs": [],
        }
        for seed in [int(s) for s in args.seeds.split(",")]:
            f1 = {}
            for name, extra in (("noisy", []), ("excluded", ["--exclude", case / "audit" / "label_issues.csv"])):
                out = case / f"{name}_seed{seed}"
                if not list(out.glob("v*")):
                    ocec("train", "--data_root", noisy, "--output_dir", out, "--seed", seed, *train, *extra)
                f1[name] = clean_val_f1(sorted(out.glob("v*"))[-1], clean)
            row["runs"].append({"seed": seed, **f1})
        results.append(row)
        print(
            f"noise {noise:.0%}: {len(wrong)} wrong, {len(flagged)} flagged, precision {row['precision']:.3f} "
            f"recall {row['recall']:.3f} | clean val F1 "
            + "; ".join(f"seed {r['seed']}: noisy {r['noisy']:.4f} excluded {r['excluded']:.4f}" for r in row["runs"]),
            flush=True,
        )
    Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"numbers: {args.json}; data and runs: {work}")


if __name__ == "__main__":
    main()
