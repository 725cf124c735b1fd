"""Every flag of `ocec train`, also taken by `ocec sweep` (where the ones given stay fixed across trials).
A table of argparse calls, kept apart from cli.py's parsers because it is most of them."""

from __future__ import annotations

import argparse

from ..core.config import (
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
    parse_grid,
    parse_image_size,
    parse_stages,
)
from ..core.errors import UserError
from .settings import FINETUNE_DEFAULTS, describe_settings


def argument_type(parse):
    """A parser raising UserError('--flag: why') as an argparse type (argparse names the flag itself)."""

    def convert(text: str):
        try:
            return parse(text)
        except UserError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None

    convert.__name__ = parse.__name__
    return convert


def add_train_flags(p) -> None:
    """Every flag of `train` (also taken by `sweep`, where the ones given stay fixed across trials)."""
    g = p.add_argument_group("data")
    g.add_argument("--data_root", help="a .parquet file or a folder of parquet files (required unless --resume)")
    g.add_argument("--output_dir", help="runs go to the next free <output_dir>/vN")
    for split in ("train", "val", "test"):
        g.add_argument(f"--{split}_ratio", type=float, help=f"share of rows for {split} when there is no split column")
    g.add_argument(
        "--image_size", type=argument_type(parse_image_size), metavar="N|HxW", help="input size, e.g. 48 or 32x64"
    )
    g.add_argument("--num_workers", type=int, help="processes that decode images (once; then cached)")
    g.add_argument("--cache_dir", help="decoded-image cache (default: $OCEC_CACHE_DIR or ~/.cache/ocec)")
    g.add_argument("--no_cache", action="store_true", help="decode every run, write no cache")
    g.add_argument(
        "--max_bad_fraction", type=float, help="stop if more than this share of images cannot be read (else skipped)"
    )
    g.add_argument(
        "--augment",
        choices=AUGMENT_LEVELS,
        help="batched augmentation: light (colour), default (+ zoom, shift, blur, noise), shift (+ grey, "
        "down-then-up scaling, random erasing, stronger colour: for a grey, small, blurred B)",
    )
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
        "--exclude",
        metavar="FILE",
        help="drop the rows this CSV (an image_path column, e.g. ocec audit's label_issues.csv) or text file "
        "(one image_path per line) lists, from every split of --data_root",
    )
    g.add_argument("--exclude_top", type=int, metavar="N", help="only the N highest-ranked rows --exclude lists")
    g.add_argument("--relabel", metavar="FILE", help="flip the labels of the rows this file lists (as --exclude)")
    g.add_argument("--split_codes", metavar="NPY", help=argparse.SUPPRESS)  # ocec audit's folds
    g.add_argument(
        "--extra_val_root",
        help="also evaluate this dataset's val split each epoch (logged as extra_val_f1; not used for selection)",
    )

    g = p.add_argument_group("model")
    g.add_argument("--arch_variant", choices=ARCH_VARIANTS, help="backbone")
    g.add_argument(
        "--head_variant",
        choices=HEAD_VARIANTS,
        help="embedding head (auto, as upstream: avg for baseline, avgmax_mlp for inverted_se, "
        "transformer for convnext)",
    )
    g.add_argument(
        "--token_mixer_grid",
        type=argument_type(parse_grid),
        metavar="HxW",
        help="transformer/mlp_mixer heads: the last feature map is pooled onto HxW tokens; it must divide it "
        "(default 2x3)",
    )
    g.add_argument("--token_mixer_layers", type=int, help="transformer/mlp_mixer heads: layers (default 2)")
    g.add_argument("--base_channels", type=int, help="channels after the stem")
    g.add_argument("--num_blocks", type=int, help="backbone blocks")
    g.add_argument("--dropout", type=float, help="dropout in the head")
    g.add_argument(
        "--margin_method", choices=MARGIN_METHODS, help="classifier: none (one logit, BCE) or a cosine margin head"
    )
    margins = ", ".join(f"{m} {s:g}/{mm:g}" for m, (s, mm) in MARGIN_DEFAULTS.items() if m != "none")
    g.add_argument("--margin_s", type=float, help=f"margin head scale (default per method, s/m: {margins})")
    g.add_argument("--margin_m", type=float, help="margin (default per method, see --margin_s)")

    g = p.add_argument_group("distillation")
    g.add_argument(
        "--teacher",
        nargs="+",
        metavar="RUN_OR_CKPT",
        help="a bigger model's soft predictions as a second target (several: their logits are averaged); "
        "any architecture and image size",
    )
    g.add_argument("--kd_alpha", type=float, help="weight of the distillation loss, the margin loss gets the rest")
    g.add_argument("--kd_temperature", type=float, help="softens both logits before they are compared")
    g.add_argument(
        "--kd_mixup",
        type=float,
        metavar="W",
        help="function matching: blend each training image with another of its batch (weight up to W <= 0.5, so "
        "it keeps its label) and distil on the blend; 0: off",
    )

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
        help="start from weights: file(s), a glob, or a run folder; the highest-F1 candidate is used. Fills in "
        f"the measured fine-tuning defaults where not given: {describe_settings(FINETUNE_DEFAULTS)}",
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
        type=argument_type(parse_stages),
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
        help="re-estimate BatchNorm statistics on this many training images before each validation, so that "
        "validation, the best checkpoint and its threshold see statistics matching the weights; 0: off",
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
