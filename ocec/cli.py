"""Command line: `python -m ocec <command>` (or the `ocec` console script). Every parser is here (the
long list of train's flags in train_flags.py); every handler is in commands.py.

`train`'s options default to "not given" (argparse.SUPPRESS): the parsed namespace is exactly what
the user set, which `train(**settings)` merges with the defaults or a checkpoint's values. Help
still shows each default, read from the config dataclasses. A user mistake (UserError, a bad flag)
prints one line on stderr and returns 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from dataclasses import asdict

from . import commands
from .core.config import DEVICE_HELP, ModelConfig, TrainConfig
from .core.errors import Interrupted, PeerFailed, UserError
from .training.flags import add_train_flags

log = logging.getLogger("ocec")
TRAIN_DEFAULTS = {**asdict(ModelConfig()), **asdict(TrainConfig())}
SPLITS = ("train", "val", "test", "all")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit code 2, and no prefix matching: with flags
    as close as --warmup_epochs and --stage_warmup_epochs, `--epoch 2` must not silently mean `--epochs 2`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def unknown_flag_error(parser: Parser, command: str, extra: list[str]) -> str:
    """'unrecognized arguments' with the closest flag of the command: a typo gets its likely meaning."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    known = [s for a in sub._actions for s in a.option_strings if s.startswith("--")]
    for word in extra:
        name = word.split("=", 1)[0]
        if name.startswith("--"):
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f"; see ocec {command} --help"
            return f"ocec {command}: error: unrecognized argument {name}{hint}"
    return f"ocec {command}: error: unrecognized arguments: {' '.join(extra)}"


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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


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
    add_train_flags(p)
    p.set_defaults(handler=commands.run_train)


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
    add_train_flags(p)
    p.set_defaults(handler=commands.run_sweep)


def _add_audit(sub) -> None:
    p = sub.add_parser(
        "audit",
        help="find wrong labels: K-fold out-of-fold predictions ranked by cleanlab (needs ocec[audit])",
        formatter_class=HelpFormatter,
        argument_default=argparse.SUPPRESS,
        description="Each fold is an `ocec train` run (with the train flags you give) on the other folds; its "
        "best checkpoint predicts the held-out fold. Writes OUTPUT_DIR/label_issues.csv, summary.json and "
        "suspects.png; re-running the command continues a killed audit. Act on it with train --exclude.",
    )
    g = p.add_argument_group("audit")
    g.add_argument("--folds", type=int, default=5, help="K: each labelled row is predicted by a model blind to it")
    g.add_argument("--n_jobs", type=int, default=1, help="folds trained at once, one process each")
    g.add_argument("--devices", default=None, help="devices for the folds, in turn: e.g. cuda:0,cuda:1")
    rules = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given")
    g.add_argument(
        "--filter_by", choices=rules, default=rules[0], help="cleanlab's flagging rule (confident_learning: fewer)"
    )
    add_train_flags(p)
    p.set_defaults(handler=commands.run_audit)


def _add_soup(sub) -> None:
    p = sub.add_parser(
        "soup",
        help="average runs fine-tuned from one A (uniform or greedy), the last K epochs of a run, or WiSE-FT",
        formatter_class=HelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN_OR_CKPT", help="the ingredients: run folders or checkpoints")
    p.add_argument("--data_root", required=True, help="B: BatchNorm re-estimated on its train split, judged on val")
    p.add_argument("--output_dir", required=True, help="where the soup checkpoint and soup.json go")
    p.add_argument("--method", choices=("greedy", "uniform"), default="greedy", help="which ingredients to keep")
    p.add_argument("--last", type=_positive_int, metavar="K", help="average the last K epoch checkpoints of one run")
    p.add_argument("--wise_ft", metavar="A", help="interpolate this checkpoint (model A) and the soup, alpha 0..1")
    p.add_argument("--data_root_a", help="with --wise_ft: also report A's val F1 at each alpha")
    _inference_flags(p, data=False)
    p.add_argument("--cache_dir", help="decoded-image cache (default: $OCEC_CACHE_DIR or ~/.cache/ocec)")
    p.set_defaults(handler=commands.run_soup)


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic eye-crop parquet dataset", formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="output folder (dataset.parquet, or part-NNN.parquet shards)")
    p.add_argument("--rows", type=int, default=1000, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--style",
        choices=("a", "b", "c"),
        default="a",
        help="a: colour photos; b: shifted infrared-like domain; c: b at real detector-crop size, heavy JPEG, "
        "ambiguous half-closed eyes (the hard regime)",
    )
    p.add_argument("--shards", type=int, default=1, help="number of parquet files")
    p.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1), help="processes that render images")
    p.add_argument("--no_split", action="store_true", help="omit the split column (ocec then makes a seeded split)")
    p.add_argument(
        "--label_noise",
        type=float,
        default=0.0,
        help="flip this share of the labels (the truth goes to a true_class_id column training never reads)",
    )
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
    p.add_argument("--batch_size", type=_positive_int, default=256, help="images per forward pass")
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
    p.add_argument(
        "--gallery",
        metavar="OUT.png",
        help="a picture of the most confident false positives and negatives, with the per-source table",
    )
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
        "--min_confidence",
        type=_threshold,
        default="auto",
        help="keep predictions whose class has at least this probability; auto: 0.9 (measured, docs/finetune.md)",
    )
    p.add_argument(
        "--threshold",
        type=_threshold,
        default="auto",
        help="the decision threshold that assigns each label, as in eval and predict; auto: the one stored with "
        "the checkpoint (0.5 if it has none)",
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
        _add_audit,
        _add_soup,
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
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as exc:  # argparse already printed its one line (or --help)
        return int(exc.code or 0)
    if extra:
        print(unknown_flag_error(parser, args.command, extra), file=sys.stderr)
        return 2
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
