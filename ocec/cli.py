"""Command line: `python -m ocec <command>` (or the `ocec` console script).

argparse stops here: each command turns its flags into config dataclasses or keyword
arguments and calls a function. A user mistake (UserError, a bad flag) prints one line on
stderr and returns 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .config import (
    ARCH_VARIANTS,
    HEAD_VARIANTS,
    MARGIN_DEFAULTS,
    MARGIN_METHODS,
    ModelConfig,
    TrainConfig,
    parse_image_size,
)
from .errors import UserError

log = logging.getLogger("ocec")
DEFAULTS = TrainConfig()
MODEL_DEFAULTS = ModelConfig()


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default ('off' for switches, 'none' for unset values)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if action.nargs == 0:  # --help and switches
            return text if action.dest == "help" else text + " (default: off)"
        if action.default is None:
            return text + " (default: none)"
        if isinstance(action.default, tuple) and len(action.default) == 2:
            return text + f" (default: {action.default[0]}x{action.default[1]})"
        return text + " (default: %(default)s)"


def _image_size(text: str) -> tuple[int, int]:
    try:
        return parse_image_size(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None


def _add_train(sub) -> Parser:
    p = sub.add_parser(
        "train",
        help="train from scratch, fine-tune (--pretrain) or resume (--resume)",
        formatter_class=HelpFormatter,
        description="Train an open/closed-eye classifier on parquet data.",
    )
    d = DEFAULTS
    g = p.add_argument_group("data")
    g.add_argument("--data_root", help="a .parquet file or a folder of parquet files (required unless --resume)")
    g.add_argument("--output_dir", default=d.output_dir, help="runs go to the next free <output_dir>/vN")
    g.add_argument(
        "--train_ratio", type=float, default=d.train_ratio, help="share of rows for train when there is no split column"
    )
    g.add_argument(
        "--val_ratio", type=float, default=d.val_ratio, help="share of rows for val when there is no split column"
    )
    g.add_argument(
        "--test_ratio", type=float, default=d.test_ratio, help="share of rows for test when there is no split column"
    )
    g.add_argument(
        "--image_size",
        type=_image_size,
        default=MODEL_DEFAULTS.image_size,
        metavar="N|HxW",
        help="input size, e.g. 48 or 32x64",
    )
    g.add_argument(
        "--num_workers", type=int, default=d.num_workers, help="processes that decode images (once; then cached)"
    )
    g.add_argument("--cache_dir", default=None, help="decoded-image cache (default: $OCEC_CACHE_DIR or ~/.cache/ocec)")
    g.add_argument("--no_cache", action="store_true", help="decode every run, write no cache")
    g.add_argument(
        "--max_bad_fraction",
        type=float,
        default=d.max_bad_fraction,
        help="stop if more than this share of images cannot be read (they are skipped otherwise)",
    )
    g.add_argument(
        "--augment", choices=("none", "light", "default"), default=d.augment, help="batched augmentation level"
    )
    g.add_argument(
        "--balance",
        choices=("none", "pos_weight", "sampler"),
        default=d.balance,
        help="class imbalance: loss weights (pos_weight), class-balanced sampling (sampler) or none",
    )
    g.add_argument("--mix_data_root", default=None, help="a second dataset (e.g. A) mixed into every training epoch")
    g.add_argument(
        "--mix_ratio", type=float, default=d.mix_ratio, help="share of each epoch drawn from --mix_data_root"
    )
    g.add_argument(
        "--extra_val_root",
        default=None,
        help="also evaluate this dataset's val split each epoch (logged as extra_val_f1; not used for selection)",
    )

    g = p.add_argument_group("model")
    g.add_argument("--arch_variant", choices=ARCH_VARIANTS, default=MODEL_DEFAULTS.arch_variant, help="backbone")
    g.add_argument(
        "--head_variant",
        choices=HEAD_VARIANTS,
        default=MODEL_DEFAULTS.head_variant,
        help="embedding head (auto: avg for baseline, avgmax_mlp otherwise)",
    )
    g.add_argument("--base_channels", type=int, default=MODEL_DEFAULTS.base_channels, help="channels after the stem")
    g.add_argument("--num_blocks", type=int, default=MODEL_DEFAULTS.num_blocks, help="backbone blocks")
    g.add_argument("--dropout", type=float, default=MODEL_DEFAULTS.dropout, help="dropout in the head")
    g.add_argument(
        "--margin_method",
        choices=MARGIN_METHODS,
        default=MODEL_DEFAULTS.margin_method,
        help="classifier: none (one logit, BCE) or a cosine margin head (cross-entropy)",
    )
    g.add_argument("--margin_s", type=float, default=None, help="margin head scale (default: 8)")
    g.add_argument("--margin_m", type=float, default=None, help="margin (default: 0.35 cosface, 0.2 arcface)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs, help="total epochs (also the target when resuming)")
    g.add_argument("--batch_size", type=int, default=d.batch_size, help="images per step")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate of every group not set below")
    g.add_argument("--backbone_lr", type=float, default=None, help="learning rate of the backbone (default: --lr)")
    g.add_argument("--head_lr", type=float, default=None, help="learning rate of the head (default: --lr)")
    g.add_argument("--margin_lr", type=float, default=None, help="learning rate of the margin head (default: --lr)")
    g.add_argument(
        "--weight_decay", type=float, default=d.weight_decay, help="AdamW weight decay (not on norms/biases)"
    )
    g.add_argument("--warmup_epochs", type=float, default=d.warmup_epochs, help="linear warmup, per step; 0 disables")
    g.add_argument(
        "--plateau_metric",
        choices=("val_loss", "val_f1"),
        default=d.plateau_metric,
        help="what the plateau scheduler watches (train split when there is no val)",
    )
    g.add_argument("--plateau_factor", type=float, default=d.plateau_factor, help="LR multiplier on a plateau")
    g.add_argument(
        "--plateau_patience", type=int, default=d.plateau_patience, help="epochs without improvement before reducing"
    )
    g.add_argument("--min_lr", type=float, default=d.min_lr, help="floor for plateau reductions")
    g.add_argument("--grad_clip", type=float, default=d.grad_clip, help="clip the gradient norm to this; 0 disables")
    g.add_argument(
        "--max_bad_steps", type=int, default=d.max_bad_steps, help="stop after this many consecutive non-finite steps"
    )
    g.add_argument("--seed", type=int, default=d.seed, help="seeds splits, init, sampling, augmentation, dropout")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    g.add_argument("--use_amp", action="store_true", help="mixed precision: fp16+GradScaler on CUDA, bf16 on CPU")

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
        choices=("auto", "random", "from_linear"),
        default=d.margin_init,
        help="a new cosface/arcface head: random, or along the old one-logit classifier (auto: when there is one)",
    )
    g.add_argument(
        "--freeze_backbone", action="store_true", help="train only the head and margin head (BN statistics frozen too)"
    )
    g.add_argument("--unfreeze_backbone_epoch", type=int, default=None, help="epoch at which to unfreeze the backbone")
    g.add_argument(
        "--unfreeze_ratio",
        type=float,
        default=d.unfreeze_ratio,
        help="share of backbone units (from the output side, stem last) unfrozen then",
    )
    g.add_argument(
        "--stage2_lr", type=float, default=None, help="backbone learning rate from --unfreeze_backbone_epoch on"
    )
    g.add_argument(
        "--stages",
        default=None,
        metavar="E:F[:LR],...",
        help="general staged unfreezing: from epoch E train the last fraction F of the backbone at LR, "
        "e.g. 1:0:1e-4,11:0.5:3e-5,40:1:1.5e-5",
    )
    g.add_argument(
        "--stage_warmup_epochs",
        type=float,
        default=d.stage_warmup_epochs,
        help="the backbone warms up again for this long at each later stage",
    )

    g = p.add_argument_group("outputs")
    g.add_argument("--keep_last", type=int, default=d.keep_last, help="epoch checkpoints kept")
    g.add_argument("--keep_best", type=int, default=d.keep_best, help="best checkpoints kept")
    g.add_argument(
        "--save_diagnostics", action="store_true", help="confusion matrix and ROC PNGs per epoch (needs ocec[plot])"
    )
    g.add_argument("--tensorboard", action="store_true", help="log scalars for TensorBoard (needs ocec[tensorboard])")
    p.set_defaults(handler=run_train)
    return p


def _common(p: Parser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def build_parser() -> Parser:
    parser = Parser(prog="ocec", description="Train and fine-tune tiny open/closed-eye classifiers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    _add_train(sub)
    from . import commands

    commands.add_parsers(sub, HelpFormatter)
    for p in _unique_parsers(parser):
        _common(p)
    return parser


def _unique_parsers(parser: Parser) -> list[Parser]:
    """Each subcommand's parser once (aliases share one)."""
    choices = parser._subparsers._group_actions[0].choices
    return list({id(p): p for p in choices.values()}.values())


def typed_flags(parser: Parser, argv: list[str]) -> set[str]:
    """Names of the options the user actually typed (a default typed explicitly counts as typed)."""
    saved = []
    for p in _unique_parsers(parser):
        for action in p._actions:
            saved.append((action, action.default))
            action.default = argparse.SUPPRESS
    try:
        namespace = parser.parse_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    return set(vars(namespace)) - {"command", "handler"}


def configs_from_args(args: argparse.Namespace) -> tuple[TrainConfig, ModelConfig]:
    margin_s, margin_m = MARGIN_DEFAULTS[args.margin_method]
    model_cfg = ModelConfig(
        arch_variant=args.arch_variant,
        base_channels=args.base_channels,
        num_blocks=args.num_blocks,
        head_variant=args.head_variant,
        dropout=args.dropout,
        margin_method=args.margin_method,
        margin_s=margin_s if args.margin_s is None else args.margin_s,
        margin_m=margin_m if args.margin_m is None else args.margin_m,
        image_size=args.image_size,
    )
    fields = set(vars(TrainConfig()))
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["pretrain"] = list(args.pretrain or [])
    values["cache_dir"] = "" if args.no_cache else args.cache_dir
    return TrainConfig(**values), model_cfg


def run_train(args: argparse.Namespace, typed: set[str]) -> int:
    from .trainer import train

    if not args.data_root and not args.resume:
        raise UserError("--data_root is required (unless --resume)")
    if args.pretrain and args.resume:
        raise UserError("--pretrain and --resume exclude each other (--resume continues a run with its own weights)")
    cfg, model_cfg = configs_from_args(args)
    if "no_cache" in typed:
        typed = typed | {"cache_dir"}
    if not args.resume:
        model_cfg.validate()
    train(cfg, model_cfg, typed)
    return 0


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


def main(argv: list[str] | None = None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        typed = typed_flags(parser, argv)
    except SystemExit as exc:  # argparse already printed its one line (or --help)
        return int(exc.code or 0)
    setup_logging()
    from .trainer import Interrupted

    try:
        return int(args.handler(args, typed) or 0)
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
