"""Parsers and handlers of the commands other than `train` (which lives in cli.py)."""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


def add_parsers(sub, formatter) -> None:
    p = sub.add_parser("synth", help="write a synthetic eye-crop parquet dataset", formatter_class=formatter)
    p.add_argument("--out", required=True, help="output folder (dataset.parquet, or part-NNN.parquet shards)")
    p.add_argument("--rows", type=int, default=1000, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--style", choices=("a", "b"), default="a", help="a: colour photos; b: shifted infrared-like domain")
    p.add_argument("--shards", type=int, default=1, help="number of parquet files")
    p.add_argument("--no_split", action="store_true", help="omit the split column (ocec then makes a seeded split)")
    p.add_argument(
        "--image_files",
        action="store_true",
        help="write PNG files next to the parquet and reference them by image_path instead of image_bytes",
    )
    p.set_defaults(handler=run_synth)

    p = sub.add_parser(
        "demo", help="synthesise A and B, train A, then scratch vs fine-tune on B", formatter_class=formatter
    )
    p.add_argument("--out", default="runs/demo", help="folder for data, cache and runs")
    p.add_argument("--rows_a", type=int, default=3000, help="images in dataset A")
    p.add_argument("--rows_b", type=int, default=1200, help="images in dataset B")
    p.add_argument("--epochs_a", type=int, default=6, help="epochs for model A")
    p.add_argument("--epochs_b", type=int, default=4, help="epochs for each run on B (same budget)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(handler=run_demo)

    p = sub.add_parser(
        "eval", help="metrics of a checkpoint on a dataset, overall and per source", formatter_class=formatter
    )
    p.add_argument(
        "--checkpoint",
        nargs="+",
        required=True,
        metavar="CKPT",
        help="checkpoint file(s), a glob or a run folder (the highest-F1 candidate is used)",
    )
    p.add_argument("--data_root", required=True, help="a .parquet file or a folder of parquet files")
    p.add_argument("--split", choices=("train", "val", "test", "all"), default="val", help="which split to evaluate")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold for 'open'")
    _inference_flags(p)
    p.add_argument("--json", metavar="OUT", help="also write the full report as JSON")
    p.set_defaults(handler=run_eval)

    p = sub.add_parser(
        "compare", help="runs side by side; optionally evaluated on one dataset and plotted", formatter_class=formatter
    )
    p.add_argument("runs", nargs="+", metavar="RUN_OR_CKPT", help="run folders (vN) or checkpoint files")
    p.add_argument("--data_root", help="evaluate every run's best checkpoint on this dataset too")
    p.add_argument(
        "--split", choices=("train", "val", "test", "all"), default="val", help="split used with --data_root"
    )
    p.add_argument("--plot", metavar="OUT.png", help="val F1, losses and LR per epoch of every run (needs ocec[plot])")
    p.add_argument("--json", metavar="OUT", help="also write the table as JSON")
    _inference_flags(p)
    p.set_defaults(handler=run_compare)

    p = sub.add_parser("predict", help="probability of 'open' for image files", formatter_class=formatter)
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT", help="checkpoint file(s) or a run folder")
    p.add_argument(
        "--inputs", nargs="+", required=True, metavar="PATH", help="image files or folders (searched recursively)"
    )
    p.add_argument("--output", metavar="CSV", help="write path,prob_open,label rows here (default: print them)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold for 'open'")
    p.add_argument("--batch_size", type=int, default=256, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(handler=run_predict)

    p = sub.add_parser(
        "export", aliases=["exportonnx"], help="write ONNX (default) or safetensors", formatter_class=formatter
    )
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT", help="checkpoint file(s) or a run folder")
    p.add_argument("--output", required=True, help="output file (.onnx or .safetensors)")
    p.add_argument("--format", choices=("onnx", "safetensors"), default="onnx", help="what to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    p.set_defaults(handler=run_export)


def _inference_flags(p) -> None:
    p.add_argument("--batch_size", type=int, default=256, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--num_workers", type=int, default=0, help="processes that decode images (once; then cached)")
    p.add_argument("--cache_dir", default=None, help="decoded-image cache (default: $OCEC_CACHE_DIR or ~/.cache/ocec)")


def run_synth(args: argparse.Namespace, typed: set[str]) -> int:
    from .synth import write_synthetic

    if args.shards < 1:
        raise UserError(f"--shards must be >= 1, got {args.shards}")
    paths = write_synthetic(
        args.out,
        args.rows,
        args.seed,
        args.style,
        shards=args.shards,
        with_split=not args.no_split,
        embed_bytes=not args.image_files,
    )
    print(f"wrote {args.rows} style-{args.style} images to {', '.join(str(p) for p in paths)}")
    return 0


def run_demo(args: argparse.Namespace, typed: set[str]) -> int:
    from .demo import run_demo as demo

    for flag in ("rows_a", "rows_b", "epochs_a", "epochs_b"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    demo(args.out, args.rows_a, args.rows_b, args.epochs_a, args.epochs_b, args.seed, args.device)
    return 0


def _check_batch(args) -> None:
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be a positive integer, got {args.batch_size}")


def run_eval(args: argparse.Namespace, typed: set[str]) -> int:
    from .evaluate import evaluate_checkpoint, format_eval
    from .fileio import write_json_atomic

    _check_batch(args)
    result = evaluate_checkpoint(
        args.checkpoint,
        args.data_root,
        args.split,
        args.batch_size,
        args.device,
        args.num_workers,
        args.cache_dir,
        args.threshold,
    )
    print(format_eval(result))
    if args.json:
        write_json_atomic(args.json, result)
        print(f"report: {args.json}")
    return 0


def run_compare(args: argparse.Namespace, typed: set[str]) -> int:
    from .evaluate import compare_runs, format_compare
    from .fileio import write_json_atomic

    _check_batch(args)
    records = compare_runs(
        args.runs, args.data_root, args.split, args.plot, args.device, args.batch_size, args.num_workers, args.cache_dir
    )
    print(format_compare(records, bool(args.data_root)))
    if args.json:
        write_json_atomic(args.json, [{k: v for k, v in r.items() if k != "history"} for r in records])
    return 0


def run_predict(args: argparse.Namespace, typed: set[str]) -> int:
    from .evaluate import predict_images

    _check_batch(args)
    rows = predict_images(args.checkpoint, args.inputs, args.output, args.threshold, args.batch_size, args.device)
    if args.output:
        print(f"{len(rows)} prediction(s) -> {args.output}")
    else:
        for r in rows:
            print(f"{r['path']},{r['prob_open']:.6f},{r['label']}")
    return 0


def run_export(args: argparse.Namespace, typed: set[str]) -> int:
    import torch

    from .evaluate import load_for_inference
    from .export import export_onnx, export_safetensors

    model, snap = load_for_inference(args.checkpoint, torch.device("cpu"))
    if args.format == "safetensors":
        report = export_safetensors(snap, args.output)
        print(
            f"wrote {report['output']} ({report['tensors']} tensors + model config); "
            f"fine-tune from it with --pretrain {report['output']}"
        )
        return 0
    report = export_onnx(model, args.output, args.opset)
    diff = report["max_abs_diff"]
    print(
        f"wrote {report['output']} (opset {report['opset']}, {report['folded_batchnorm']} Conv+BatchNorm folded; "
        f"input images [N,3,{snap.model_config.image_size[0]},{snap.model_config.image_size[1]}] RGB 0..1, "
        f"output prob_open [N])"
    )
    if diff is not None:
        print(f"onnxruntime vs PyTorch: max |difference| {diff:.2e}")
        if diff >= 1e-4:
            print(f"ocec export: error: the ONNX model differs from PyTorch by {diff:.2e} (>= 1e-4)", file=sys.stderr)
            return 1
    return 0
