"""The handler of every command: parsed flags -> keyword arguments of the function doing the work.

Heavy modules (torch, the trainer) are imported inside the handlers, so `--help` and argument
errors stay fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core.errors import UserError

NOT_SETTINGS = {"command", "handler", "debug"}


def run_train(args: argparse.Namespace) -> int:
    from .training.trainer import train

    train(**{k: v for k, v in vars(args).items() if k not in NOT_SETTINGS})
    return 0


SWEEP_ONLY = (
    "trials",
    "space",
    "storage",
    "study",
    "timeout",
    "n_jobs",
    "devices",
    "pruner",
    "heartbeat",
    "plot",
    "final_epochs",
)


def run_sweep(args: argparse.Namespace) -> int:
    import shlex
    import subprocess

    from .tools.sweep import format_leaderboard, require_optuna
    from .tools.sweep import run_sweep as sweep
    from .training.settings import settings_to_flags

    require_optuna()
    given = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS and k not in SWEEP_ONLY}
    for name in ("resume", "output_dir", "data_root"):
        if name == "resume" and "resume" in given:
            raise UserError("--resume: a sweep starts its own runs; re-run the same sweep command to continue it")
        if name != "resume" and name not in given:
            raise UserError(f"--{name} is required for a sweep")
    if args.trials < 1 or args.n_jobs < 1:
        raise UserError(f"--trials and --n_jobs must be >= 1, got {args.trials} and {args.n_jobs}")
    pretrain = [str(p) for p in given.pop("pretrain", [])]
    output_dir = given.pop("output_dir")
    fixed = settings_to_flags(given)
    result = sweep(
        output_dir=output_dir,
        trials=args.trials,
        fixed=fixed,
        pretrain=pretrain,
        mix="mix_data_root" in given,
        space_file=args.space,
        storage=args.storage,
        study_name=args.study,
        timeout=args.timeout,
        n_jobs=args.n_jobs,
        devices=args.devices.split(",") if args.devices else [],
        pruner=args.pruner,
        seed=given.get("seed", 42),
        heartbeat=args.heartbeat,
        plot=args.plot,
        fixed_settings=given,
        final_run=bool(args.final_epochs),
    )
    print(format_leaderboard(result))
    print(f"leaderboard: {Path(output_dir) / 'leaderboard.csv'} and .json")
    for path in result.get("plots", []):
        print(f"plot: {path}")
    best = result["best"]
    if best is None:
        print("no trial completed")
        return 1
    print(f"best: trial {best['trial']}, val F1 {best['best_f1']:.4f} at epoch {best['best_epoch']}; its command:")
    print(best["command"])
    if args.final_epochs and not result["final_claimed"]:
        print(f"final run: another sweep process of this study trains trial {best['trial']} (one is enough)")
    elif args.final_epochs:
        command = shlex.split(best["command"])
        command = [
            sys.executable,
            *command[1:],
            "--epochs",
            str(args.final_epochs),
            "--output_dir",
            str(Path(output_dir) / "final"),
        ]
        print(f"final run: {shlex.join(['python', *command[1:]])}")
        return subprocess.call(command)
    return 0


def run_audit(args: argparse.Namespace) -> int:
    from .tools.audit import require_cleanlab
    from .tools.audit import run_audit as audit
    from .training.settings import settings_to_flags

    require_cleanlab()
    audit_only = ("folds", "n_jobs", "devices", "filter_by")
    given = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS and k not in audit_only}
    for name in ("data_root", "output_dir"):
        if name not in given:
            raise UserError(f"--{name} is required for an audit")
    for name in ("resume", "split_codes", "exclude", "relabel"):
        if name in given:
            raise UserError(f"--{name}: an audit trains its own folds on every labelled row; it takes no --{name}")
    if args.folds < 2 or args.n_jobs < 1:
        raise UserError(f"--folds must be >= 2 and --n_jobs >= 1, got {args.folds} and {args.n_jobs}")
    data_root, output_dir = given.pop("data_root"), given.pop("output_dir")
    summary = audit(
        data_root=data_root,
        output_dir=output_dir,
        folds=args.folds,
        n_jobs=args.n_jobs,
        devices=args.devices.split(",") if args.devices else [],
        train_flags=settings_to_flags(given),
        seed=given.get("seed", 42),
        cache_dir=given.get("cache_dir"),
        no_cache=given.get("no_cache", False),
        batch_size=given.get("batch_size", 256),
        filter_by=args.filter_by,
    )
    print(
        f"audit: {summary['flagged']} of {summary['rows_audited']} labels flagged "
        f"({summary['estimated_wrong_share']:.1%}); "
        + ", ".join(f"{c} {v['flagged']}/{v['rows']}" for c, v in summary["per_class"].items())
    )
    out = Path(output_dir)
    print(f"ranked: {out / 'label_issues.csv'}; summary: {out / 'summary.json'}; pictures: {summary['suspects']}")
    print(f"train without them: ocec train --data_root {data_root} --exclude {out / 'label_issues.csv'} ...")
    return 0


def run_soup(args: argparse.Namespace) -> int:
    from .tools.soup import make_soup

    if args.data_root_a and not args.wise_ft:
        raise UserError("--data_root_a reports A's F1 along the WiSE-FT path: it needs --wise_ft A")
    result = make_soup(
        args.runs,
        data_root=args.data_root,
        output_dir=args.output_dir,
        method=args.method,
        last=args.last,
        wise_ft=args.wise_ft,
        data_root_a=args.data_root_a,
        device=args.device,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
    )
    means = [i["val_f1"] for i in result["ingredients"]]
    print(
        f"soup ({result['method']}): val F1 {result['val_f1']:.4f} "
        f"(ingredients {min(means):.4f}..{max(means):.4f}, {len(result['kept']) or len(means)} kept)"
        + (f", WiSE-FT alpha {result['alpha']:.1f}" if "alpha" in result else "")
    )
    if "test_f1" in result:
        print(f"test F1 {result['test_f1']:.4f} (mean of the ingredients {result['ingredients_mean_test_f1']:.4f})")
    print(f"checkpoint: {result['checkpoint']}")
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from .data.synth import write_synthetic

    if args.shards < 1:
        raise UserError(f"--shards must be >= 1, got {args.shards}")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be >= 0, got {args.num_workers}")
    paths = write_synthetic(
        args.out,
        args.rows,
        args.seed,
        args.style,
        shards=args.shards,
        with_split=not args.no_split,
        embed_bytes=not args.image_files,
        num_workers=args.num_workers,
        label_noise=args.label_noise,
    )
    print(f"wrote {args.rows} style-{args.style} images to {', '.join(str(p) for p in paths)}")
    if args.label_noise:
        print(f"about {args.label_noise:.0%} of the labels are flipped on purpose; the truth is in true_class_id")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .tools.demo import run_demo as demo

    for flag in ("rows_a", "rows_b", "epochs_a", "epochs_b"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    demo(
        args.out,
        rows_a=args.rows_a,
        rows_b=args.rows_b,
        epochs_a=args.epochs_a,
        epochs_b=args.epochs_b,
        seed=args.seed,
        device=args.device,
    )
    return 0


def _data_options(args: argparse.Namespace) -> dict:
    """Keyword arguments shared by the commands that read a dataset and run a model over it."""
    if not 0.0 <= args.max_bad_fraction <= 1.0:
        raise UserError(f"--max_bad_fraction must be in [0, 1], got {args.max_bad_fraction}")
    from .data.decode import cache_location

    return dict(
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.num_workers,
        cache_dir=cache_location(args.cache_dir, args.no_cache),
        max_bad_fraction=args.max_bad_fraction,
    )


def run_eval(args: argparse.Namespace) -> int:
    from .core.fileio import write_json_atomic
    from .tools.evaluate import evaluate_checkpoint, format_eval

    result = evaluate_checkpoint(
        args.checkpoint,
        args.data_root,
        split=args.split,
        threshold=args.threshold,
        gallery=args.gallery,
        **_data_options(args),
    )
    print(format_eval(result))
    if args.gallery:
        print(f"gallery of the most confident mistakes: {result['gallery']}")
    if args.json:
        write_json_atomic(args.json, result)
        print(f"report: {args.json}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from .core.fileio import write_json_atomic
    from .tools.evaluate import compare_runs, format_compare

    records = compare_runs(args.runs, data_root=args.data_root, split=args.split, plot=args.plot, **_data_options(args))
    print(format_compare(records, bool(args.data_root)))
    if args.json:
        write_json_atomic(args.json, [{k: v for k, v in r.items() if k != "history"} for r in records])
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from .tools.predict import predict_images, predict_parquet, write_predictions

    if args.data_root:
        table = predict_parquet(args.checkpoint, args.data_root, threshold=args.threshold, **_data_options(args))
    else:
        table = predict_images(
            args.checkpoint, args.inputs, threshold=args.threshold, batch_size=args.batch_size, device=args.device
        )
    write_predictions(table, args.output)
    if args.output:
        print(f"{table.num_rows} prediction(s) -> {args.output}")
    return 0


def run_pseudo_label(args: argparse.Namespace) -> int:
    from .finetune.pseudo import pseudo_label

    report = pseudo_label(
        args.checkpoint,
        args.data_root,
        args.out,
        min_confidence=args.min_confidence,
        threshold=args.threshold,
        balance=args.balance,
        **_data_options(args),
    )
    print(
        f"kept {report['kept']} of {report['rows']} rows (open {report['open']}, closed {report['closed']} at "
        f"threshold {report['threshold']:.3g}; "
        f"confidence >= {report['min_confidence']:.3f}, mean {report['mean_confidence']:.3f}) -> {report['output']}"
    )
    if report["held_out"]:
        print(f"left out {report['held_out']} row(s) of the data's val/test split: they judge models, never train them")
    print(f"train on them with: --extra_train_root {Path(report['output']).parent}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from .api import export

    report = export(args.checkpoint, args.output, format=args.format, opset=args.opset, threshold=args.threshold)
    if args.format == "safetensors":
        print(
            f"wrote {report['output']} ({report['tensors']} tensors + model config); "
            f"fine-tune from it with --pretrain {report['output']}"
        )
        return 0
    h, w = report["image_size"]
    print(
        f"wrote {report['output']} (opset {report['opset']}, {report['folded_batchnorm']} Conv+BatchNorm folded; "
        f"input images [N,3,{h},{w}] RGB 0..1, outputs prob_open [N], logit [N] and is_open [N] "
        f"= prob_open >= {report['threshold']:.4g})"
    )
    if report["max_abs_diff"] is not None:
        print(
            f"onnxruntime vs PyTorch on {report['check_images']} eye images: max |logit difference| "
            f"{report['max_abs_diff']:.2e} (tolerance {report['tolerance']:.0e} + {report['tolerance']:.0e} x |logit|)"
        )
        if not report["passed"]:
            print(
                "ocec export: error: the ONNX model's logits differ from PyTorch beyond the tolerance", file=sys.stderr
            )
            return 1
    if "opencv_passed" in report:
        if report.get("opencv_error"):
            print(f"OpenCV {report['opencv']} DNN cannot run it: {report['opencv_error']}")
        else:
            print(
                f"OpenCV {report['opencv']} DNN vs PyTorch: max |prob_open difference| "
                f"{report['opencv_max_abs_diff']:.2e}" + ("" if report["opencv_passed"] else " (beyond the tolerance)")
            )
    return 0
