"""Command line: `python -m ocec <command>` (or the `ocec` console script). Every parser is here;
every handler is in commands.py.

`train`'s options default to "not given" (argparse.SUPPRESS): the parsed namespace is exactly what
the user set, which `train(**settings)` merges with the defaults or a checkpoint's values. Help
still shows each default, read from the config dataclasses. A user mistake (UserError, a bad flag)
prints one line on stderr and returns 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict

from . import commands
from .config import (
    ARCH_VARIANTS,
    AUGMENT_LEVELS,
    BALANCE_MODES,
    DEVICE_HELP,
    HEAD_VARIANTS,
    MARGIN_DEFAULTS,
    MARGIN_INITS,
    MARGIN_METHODS,
    PLATEAU_METRICS,
    RECIPES,
    UNFREEZE_SIDES,
    ModelConfig,
    TrainConfig,
    parse_image_size,
    parse_stages,
)
from .errors import Interrupted, PeerFailed, UserError

log = logging.getLogger("ocec")
TRAIN_DEFAULTS = {**asdict(ModelConfig()), **asdict(TrainConfig())}
SPLITS = ("train", "val", "test", "all")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default ('off' for switches, 'none' for unset values);
    `train`'s suppressed defaults are read from the config dataclasses."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not action.option_strings or action.dest == "help":
            return text
        default = TRAIN_DEFAULTS.get(action.dest) if action.default is argparse.SUPPRESS else action.default
        if action.nargs == 0:
            return text + " (default: off)"
        if default is None or default == []:
            return text + " (default: none)"
        if isinstance(default, tuple) and len(default) == 2:
            return text + f" (default: {default[0]}x{default[1]})"
        return text + f" (default: {default})"


def _argument_type(parse):
    """A parser raising UserError('--flag: why') as an argparse type (argparse names the flag itself)."""

    def convert(text: str):
        try:
            return parse(text)
        except UserError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None

    convert.__name__ = parse.__name__
    return convert


def _threshold(text: str):
    """--threshold: 'auto' (the val-optimal threshold stored with the checkpoint) or a probability."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a probability, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a probability is in [0, 1], got {value}")
    return value


THRESHOLD_HELP = (
    "probability threshold for 'open': a number, or auto for the val-optimal one stored with the checkpoint"
)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train from scratch, fine-tune (--pretrain) or resume (--resume)",
        formatter_class=HelpFormatter,
        argument_default=argparse.SUPPRESS,
        description="Train an open/closed-eye classifier on parquet data.",
    )
    _train_flags(p)
    p.set_defaults(handler=commands.run_train)


def _train_flags(p) -> None:
    """Every flag of `train` (also taken by `sweep`, where the ones given stay fixed across trials)."""
    g = p.add_argument_group("data")
    g.add_argument("--data_root", help="a .parquet file or a folder of parquet files (required unless --resume)")
    g.add_argument("--output_dir", help="runs go to the next free <output_dir>/vN")
    for split in ("train", "val", "test"):
        g.add_argument(f"--{split}_ratio", type=float, help=f"share of rows for {split} when there is no split column")
    g.add_argument(
        "--image_size", type=_argument_type(parse_image_size), metavar="N|HxW", help="input size, e.g. 48 or 32x64"
    )
    g.add_argument("--num_workers", type=int, help="processes that decode images (once; then cached)")
    g.add_argument("--cache_dir", help="decoded-image cache (default: $OCEC_CACHE_DIR or ~/.cache/ocec)")
    g.add_argument("--no_cache", action="store_true", help="decode every run, write no cache")
    g.add_argument(
        "--max_bad_fraction", type=float, help="stop if more than this share of images cannot be read (else skipped)"
    )
    g.add_argument("--augment", choices=AUGMENT_LEVELS, help="batched augmentation level")
    g.add_argument(
        "--balance",
        choices=BALANCE_MODES,
        help="class imbalance: loss weights (pos_weight), class-balanced sampling (sampler) or none",
    )
    g.add_argument("--mix_data_root", help="a second dataset (e.g. A) mixed into every training epoch")
    g.add_argument("--mix_ratio", type=float, help="share of each epoch drawn from --mix_data_root")
    g.add_argument(
        "--extra_train_root",
        help="add this dataset's train split to every epoch (e.g. the output of ocec pseudo-label)",
    )
    g.add_argument(
        "--extra_val_root",
        help="also evaluate this dataset's val split each epoch (logged as extra_val_f1; not used for selection)",
    )

    g = p.add_argument_group("model")
    g.add_argument("--arch_variant", choices=ARCH_VARIANTS, help="backbone")
    g.add_argument(
        "--head_variant", choices=HEAD_VARIANTS, help="embedding head (auto: avg for baseline, else avgmax_mlp)"
    )
    g.add_argument("--base_channels", type=int, help="channels after the stem")
    g.add_argument("--num_blocks", type=int, help="backbone blocks")
    g.add_argument("--dropout", type=float, help="dropout in the head")
    g.add_argument(
        "--margin_method", choices=MARGIN_METHODS, help="classifier: none (one logit, BCE) or a cosine margin head"
    )
    margins = ", ".join(f"{m} {s:g}/{mm:g}" for m, (s, mm) in MARGIN_DEFAULTS.items() if m != "none")
    g.add_argument("--margin_s", type=float, help=f"margin head scale (default per method, s/m: {margins})")
    g.add_argument("--margin_m", type=float, help="margin (default per method, see --margin_s)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="total epochs (also the target when resuming)")
    g.add_argument("--batch_size", type=int, help="images per step")
    g.add_argument("--lr", type=float, help="AdamW learning rate of every group not set below")
    g.add_argument("--backbone_lr", type=float, help="learning rate of the backbone (default: --lr)")
    g.add_argument("--head_lr", type=float, help="learning rate of the head (default: --lr)")
    g.add_argument("--margin_lr", type=float, help="learning rate of the margin head (default: --lr)")
    g.add_argument("--weight_decay", type=float, help="AdamW weight decay (not on norms/biases)")
    g.add_argument("--warmup_epochs", type=float, help="linear warmup, per step; 0 disables")
    g.add_argument(
        "--plateau_metric", choices=PLATEAU_METRICS, help="what the plateau scheduler watches (train split without val)"
    )
    g.add_argument("--plateau_factor", type=float, help="LR multiplier on a plateau")
    g.add_argument("--plateau_patience", type=int, help="epochs without improvement before reducing")
    g.add_argument("--min_lr", type=float, help="floor for plateau reductions (never raises a lower rate)")
    g.add_argument("--grad_clip", type=float, help="clip the gradient norm to this; 0 disables")
    g.add_argument("--max_bad_steps", type=int, help="stop after this many consecutive non-finite steps")
    g.add_argument("--seed", type=int, help="seeds splits, init, sampling, augmentation, dropout")
    g.add_argument("--device", help=DEVICE_HELP)
    g.add_argument("--use_amp", action="store_true", help="mixed precision: fp16+GradScaler on CUDA, bf16 on CPU")
    g.add_argument(
        "--sync_bn",
        action="store_true",
        help="under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm); one process: no effect",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training forward/backward (pays off on GPUs; falls back with a message)",
    )

    g = p.add_argument_group("fine-tuning")
    g.add_argument(
        "--pretrain",
        nargs="+",
        metavar="CKPT",
        help="start from weights: file(s), a glob, or a run folder; the highest-F1 candidate is used",
    )
    g.add_argument("--resume", metavar="CKPT|RUN", help="continue a run from a checkpoint or its folder's latest one")
    g.add_argument("--reinit_head", action="store_true", help="re-initialise the head and margin head after --pretrain")
    g.add_argument(
        "--margin_init",
        choices=MARGIN_INITS,
        help="a new cosface/arcface head: random, or along the old one-logit classifier (auto: when there is one)",
    )
    g.add_argument("--freeze_backbone", action="store_true", help="train only the head and margin head (BN frozen too)")
    g.add_argument("--unfreeze_backbone_epoch", type=int, help="epoch at which to unfreeze the backbone")
    g.add_argument(
        "--unfreeze_ratio",
        type=float,
        help="share of backbone units (from the output side, stem last) unfrozen then (default: 1.0)",
    )
    g.add_argument("--stage2_lr", type=float, help="backbone learning rate from --unfreeze_backbone_epoch on")
    g.add_argument(
        "--stages",
        type=_argument_type(parse_stages),
        metavar="E:F[:LR],...",
        help="general staged unfreezing: from epoch E train the last fraction F of the backbone at LR, "
        "e.g. 1:0:1e-4,11:0.5:3e-5,40:1:1.5e-5",
    )
    g.add_argument(
        "--stage_warmup_epochs", type=float, help="the backbone warms up again for this long at each later stage"
    )
    g.add_argument(
        "--unfreeze_from",
        choices=UNFREEZE_SIDES,
        help="stages release backbone units from the output side, or from the input side (surgical fine-tuning)",
    )
    g.add_argument(
        "--recipe",
        choices=RECIPES,
        help="a fine-tuning recipe, expanded into stage flags (logged and stored in config.json; flags you give "
        "override it): full, lp-ft (linear probe, then fine-tune), surgical (the input half), progressive",
    )
    g.add_argument(
        "--bn_adapt",
        action="store_true",
        help="re-estimate BatchNorm statistics on the training images after --pretrain loads (AdaBN; "
        "on by default with --pretrain)",
    )
    g.add_argument("--no_bn_adapt", dest="bn_adapt", action="store_false", help="keep model A's BatchNorm statistics")
    g.add_argument(
        "--precise_bn",
        type=int,
        metavar="IMAGES",
        help="re-estimate BatchNorm statistics on this many training images before each validation; 0: off",
    )
    g.add_argument(
        "--ema_decay",
        type=float,
        help="validate, select and export an exponential moving average of the weights, e.g. 0.999",
    )
    g.add_argument(
        "--l2sp",
        type=float,
        metavar="ALPHA",
        help="pull the backbone towards the pretrained weights (L2-SP) instead of weight decay towards zero",
    )
    g.add_argument("--layer_decay", type=float, help="backbone LR x G^k for the k-th unit from the output side; 1: off")
    g.add_argument(
        "--hard_mining",
        type=float,
        metavar="SHARE",
        help="draw this share of each epoch in proportion to each sample's loss in the previous epoch",
    )

    g = p.add_argument_group("outputs")
    g.add_argument("--keep_last", type=int, help="epoch checkpoints kept")
    g.add_argument("--keep_best", type=int, help="best checkpoints kept")
    g.add_argument(
        "--save_diagnostics", action="store_true", help="confusion matrix and ROC PNGs per epoch (ocec[plot])"
    )
    g.add_argument("--tensorboard", action="store_true", help="log scalars for TensorBoard (needs ocec[tensorboard])")


def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="search fine-tuning recipes and hyper-parameters with Optuna (needs ocec[sweep])",
        formatter_class=HelpFormatter,
        argument_default=argparse.SUPPRESS,
        description="Each trial is an `ocec train` run in OUTPUT_DIR/trial_NNNN; the train flags you give stay "
        "fixed across trials, the search space varies the rest. Re-running the command continues the study.",
    )
    g = p.add_argument_group("sweep")
    g.add_argument("--trials", type=int, default=20, help="trials this command runs (the study keeps earlier ones)")
    g.add_argument(
        "--space", metavar="FILE", default=None, help="a YAML or JSON file narrowing or widening the search space"
    )
    g.add_argument(
        "--storage", default=None, help="an Optuna storage URL shared by several sweeps (default: sqlite in OUTPUT_DIR)"
    )
    g.add_argument("--study", default="ocec", help="the study's name in the storage")
    g.add_argument("--timeout", type=float, default=None, help="start no trial after this many seconds")
    g.add_argument("--n_jobs", type=int, default=1, help="trials at once on this machine, one process each")
    g.add_argument("--devices", default=None, help="devices for the trials, in turn: e.g. cuda:0,cuda:1")
    g.add_argument(
        "--pruner", choices=("median", "hyperband", "none"), default="median", help="stops hopeless trials early"
    )
    g.add_argument(
        "--heartbeat", type=int, default=60, help="seconds; a trial silent for twice this long is marked failed"
    )
    g.add_argument(
        "--plot", action="store_true", default=False, help="optimisation history and parameter importances, as PNG"
    )
    g.add_argument(
        "--final_epochs", type=int, default=None, help="then train the best trial's command for this many epochs"
    )
    _train_flags(p)
    p.set_defaults(handler=commands.run_sweep)


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic eye-crop parquet dataset", formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="output folder (dataset.parquet, or part-NNN.parquet shards)")
    p.add_argument("--rows", type=int, default=1000, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--style", choices=("a", "b"), default="a", help="a: colour photos; b: shifted infrared-like domain")
    p.add_argument("--shards", type=int, default=1, help="number of parquet files")
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1), help="processes that render images")
    p.add_argument("--no_split", action="store_true", help="omit the split column (ocec then makes a seeded split)")
    p.add_argument(
        "--image_files",
        action="store_true",
        help="write PNG files next to the parquet and reference them by image_path instead of image_bytes",
    )
    p.set_defaults(handler=commands.run_synth)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="synthesise A and B, train A, then scratch vs fine-tune on B", formatter_class=HelpFormatter
    )
    p.add_argument("--out", default="runs/demo", help="folder for data, cache and runs")
    p.add_argument("--rows_a", type=int, default=3000, help="images in dataset A")
    p.add_argument("--rows_b", type=int, default=1200, help="images in dataset B")
    p.add_argument("--epochs_a", type=int, default=6, help="epochs for model A")
    p.add_argument("--epochs_b", type=int, default=4, help="epochs for each run on B (same budget)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(handler=commands.run_demo)


def _checkpoint_flag(p, help_text="checkpoint file(s), a glob or a run folder (the highest-F1 candidate is used)"):
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT", help=help_text)


def _inference_flags(p, data: bool = True) -> None:
    p.add_argument("--batch_size", type=int, default=256, help="images per forward pass")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    if data:
        p.add_argument("--num_workers", type=int, default=0, help="processes that decode images (once; then cached)")
        p.add_argument("--cache_dir", help="decoded-image cache (default: $OCEC_CACHE_DIR or ~/.cache/ocec)")
        p.add_argument("--no_cache", action="store_true", help="decode every time, write no cache")
        p.add_argument(
            "--max_bad_fraction",
            type=float,
            default=TrainConfig.max_bad_fraction,
            help="stop if more than this share of images cannot be read (else skipped)",
        )


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="metrics of a checkpoint on a dataset, overall and per source", formatter_class=HelpFormatter
    )
    _checkpoint_flag(p)
    p.add_argument("--data_root", required=True, help="a .parquet file or a folder of parquet files")
    p.add_argument("--split", choices=SPLITS, default="val", help="which split to evaluate")
    p.add_argument("--threshold", type=_threshold, default=0.5, help=THRESHOLD_HELP)
    _inference_flags(p)
    p.add_argument("--json", metavar="OUT", help="also write the full report as JSON")
    p.set_defaults(handler=commands.run_eval)


def _add_compare(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="runs side by side; optionally evaluated on one dataset and plotted",
        formatter_class=HelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN_OR_CKPT", help="run folders (vN) or checkpoint files")
    p.add_argument("--data_root", help="evaluate every run's best checkpoint on this dataset too (one split for all)")
    p.add_argument("--split", choices=SPLITS, default="val", help="split used with --data_root")
    p.add_argument("--plot", metavar="OUT.png", help="val F1, losses and LR per epoch of every run (needs ocec[plot])")
    p.add_argument("--json", metavar="OUT", help="also write the table as JSON")
    _inference_flags(p)
    p.set_defaults(handler=commands.run_compare)


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict", help="probability of 'open' for image files or a parquet dataset", formatter_class=HelpFormatter
    )
    _checkpoint_flag(p, "checkpoint file(s) or a run folder")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--inputs", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    what.add_argument("--data_root", help="a parquet file or folder, with or without label columns: every row")
    p.add_argument("--output", metavar="CSV", help="write the rows here (default: print them)")
    p.add_argument("--threshold", type=_threshold, default=0.5, help=THRESHOLD_HELP)
    _inference_flags(p)
    p.set_defaults(handler=commands.run_predict)


def _add_pseudo_label(sub) -> None:
    p = sub.add_parser(
        "pseudo-label",
        help="confident predictions on unlabelled data, as a parquet to mix into training",
        formatter_class=HelpFormatter,
    )
    _checkpoint_flag(p, "the model that labels: checkpoint file(s) or a run folder")
    p.add_argument("--data_root", required=True, help="a parquet file or folder (label columns are not needed)")
    p.add_argument("--out", required=True, help="output folder (dataset.parquet)")
    p.add_argument(
        "--threshold",
        type=_threshold,
        default="auto",
        help="keep predictions whose class has at least this probability; auto: 0.9 (measured, docs/finetune.md)",
    )
    p.add_argument("--balance", action="store_true", help="keep as many rows of each class")
    _inference_flags(p)
    p.set_defaults(handler=commands.run_pseudo_label)


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", aliases=["exportonnx"], help="write ONNX (default) or safetensors", formatter_class=HelpFormatter
    )
    _checkpoint_flag(p, "checkpoint file(s) or a run folder")
    p.add_argument("--output", required=True, help="output file (.onnx or .safetensors)")
    p.add_argument("--format", choices=("onnx", "safetensors"), default="onnx", help="what to write")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    p.add_argument("--threshold", type=_threshold, default=0.5, help=THRESHOLD_HELP + " (the graph's is_open output)")
    p.set_defaults(handler=commands.run_export)


def build_parser() -> Parser:
    parser = Parser(prog="ocec", description="Train and fine-tune tiny open/closed-eye classifiers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    for add in (
        _add_train,
        _add_sweep,
        _add_synth,
        _add_demo,
        _add_eval,
        _add_compare,
        _add_predict,
        _add_pseudo_label,
        _add_export,
    ):
        add(sub)
    for p in {id(p): p for p in sub.choices.values()}.values():  # aliases share one parser
        p.add_argument("--debug", action="store_true", default=False, help="show tracebacks for errors")
    return parser


def setup_logging() -> None:
    logger = logging.getLogger("ocec")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in [h for h in logger.handlers if getattr(h, "_ocec_console", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._ocec_console = True
    logger.addHandler(handler)
    logging.raiseExceptions = False  # a closed stdout (ocec predict | head) is not worth a traceback


def main(argv: list[str] | None = None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one line (or --help)
        return int(exc.code or 0)
    setup_logging()
    try:
        return int(args.handler(args) or 0)
    except PeerFailed:  # the process that failed printed the error
        return 2
    except UserError as exc:
        if args.debug:
            raise
        print(f"ocec {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"ocec {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (ocec predict ... | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
