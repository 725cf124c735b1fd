"""The handler of every command: parsed flags -> keyword arguments of the function doing the work.

Heavy modules (torch, the trainer) are imported inside the handlers, so `--help` and argument
errors stay fast.
"""

from __future__ import annotations

import argparse
import sys

from .errors import UserError

NOT_SETTINGS = {"command", "handler", "debug"}


def run_train(args: argparse.Namespace) -> int:
    from .trainer import train

    train(**{k: v for k, v in vars(args).items() if k not in NOT_SETTINGS})
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from .synth import write_synthetic

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
    )
    print(f"wrote {args.rows} style-{args.style} images to {', '.join(str(p) for p in paths)}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as demo

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
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be a positive integer, got {args.batch_size}")
    if not 0.0 <= args.max_bad_fraction <= 1.0:
        raise UserError(f"--max_bad_fraction must be in [0, 1], got {args.max_bad_fraction}")
    from .decode import cache_location

    return dict(
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.num_workers,
        cache_dir=cache_location(args.cache_dir, args.no_cache),
        max_bad_fraction=args.max_bad_fraction,
    )


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint, format_eval
    from .fileio import write_json_atomic

    result = evaluate_checkpoint(
        args.checkpoint, args.data_root, split=args.split, threshold=args.threshold, **_data_options(args)
    )
    print(format_eval(result))
    if args.json:
        write_json_atomic(args.json, result)
        print(f"report: {args.json}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from .evaluate import compare_runs, format_compare
    from .fileio import write_json_atomic

    records = compare_runs(args.runs, data_root=args.data_root, split=args.split, plot=args.plot, **_data_options(args))
    print(format_compare(records, bool(args.data_root)))
    if args.json:
        write_json_atomic(args.json, [{k: v for k, v in r.items() if k != "history"} for r in records])
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from .evaluate import predict_images

    if args.batch_size < 1:
        raise UserError(f"--batch_size must be a positive integer, got {args.batch_size}")
    rows = predict_images(
        args.checkpoint,
        args.inputs,
        output=args.output,
        threshold=args.threshold,
        batch_size=args.batch_size,
        device=args.device,
    )
    if args.output:
        print(f"{len(rows)} prediction(s) -> {args.output}")
    else:
        for r in rows:
            print(f"{r['path']},{r['prob_open']:.6f},{r['label']}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    import torch

    from .export import export_onnx, export_safetensors
    from .pretrained import load_for_inference

    model, snap, _ = load_for_inference(args.checkpoint, torch.device("cpu"))
    if args.format == "safetensors":
        report = export_safetensors(snap, args.output)
        print(
            f"wrote {report['output']} ({report['tensors']} tensors + model config); "
            f"fine-tune from it with --pretrain {report['output']}"
        )
        return 0
    report = export_onnx(model, args.output, opset=args.opset)
    h, w = snap.model_config.image_size
    print(
        f"wrote {report['output']} (opset {report['opset']}, {report['folded_batchnorm']} Conv+BatchNorm folded; "
        f"input images [N,3,{h},{w}] RGB 0..1, outputs prob_open [N] and logit [N])"
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
    return 0
