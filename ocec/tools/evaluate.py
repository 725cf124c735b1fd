"""Judging models: `eval` (metrics of one checkpoint on a dataset), `compare` (runs side by side),
`predict` (probabilities for image files)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.config import TrainConfig
from ..core.errors import UserError
from .gallery import error_gallery, save_png
from ..core.fileio import to_jsonable
from ..core.metrics import fisher_ratio, full_report
from ..data.dataset import Split, load_dataset
from ..engine.inference import predict_split, require_finite
from ..engine.runtime import resolve_device
from ..finetune.pretrained import Snapshot, choose_best, load_for_inference, resolve_threshold

log = logging.getLogger("ocec")


def split_settings_of(train_config: dict) -> dict:
    """How a run (its recorded train config) split data without a 'split' column: ratios and seed."""
    defaults = TrainConfig()
    ratios = tuple(train_config.get(k, getattr(defaults, k)) for k in ("train_ratio", "val_ratio", "test_ratio"))
    return {"ratios": ratios, "seed": train_config.get("seed", defaults.seed)}


def load_split(
    data_root: str,
    split: str,
    image_size: tuple[int, int],
    *,
    ratios: tuple,
    seed: int,
    num_workers: int,
    cache_dir,
    max_bad_fraction: float,
) -> Split:
    """One split of a dataset (or 'all' of it), decoded at `image_size`."""
    data = load_dataset(
        data_root,
        image_size,
        ratios=ratios,
        seed=seed,
        num_workers=num_workers,
        cache_dir=cache_dir,
        max_bad_fraction=max_bad_fraction,
    )
    if split == "all":
        return data.all()
    chosen = data.get(split)
    if chosen is None:
        raise UserError(f"--data_root {data_root}: the {split} split is empty (try --split all)")
    return chosen


def evaluate_checkpoint(
    checkpoint: list[str],
    data_root: str,
    *,
    split: str = "val",
    threshold: float | str = 0.5,
    batch_size: int,
    device: str,
    num_workers: int,
    cache_dir,
    max_bad_fraction: float,
    split_settings: dict | None = None,
    loaded: dict | None = None,
    gallery: str | None = None,
) -> dict:
    """Metrics of the best of `checkpoint` on one split of `data_root`. Data without a 'split' column is
    split as the checkpoint's run split it, unless `split_settings` (ratios, seed) says otherwise.
    `loaded` caches decoded splits across calls (compare evaluates several runs on one dataset)."""
    dev = resolve_device(device)
    model, snap, why = load_for_inference(checkpoint, dev)
    log.info("checkpoint: %s", why)
    settings = split_settings or split_settings_of(snap.train_config)
    key = (snap.model_config.image_size, split, settings["ratios"], settings["seed"])
    loaded = {} if loaded is None else loaded
    if key not in loaded:
        loaded[key] = load_split(
            data_root,
            split,
            snap.model_config.image_size,
            num_workers=num_workers,
            cache_dir=cache_dir,
            max_bad_fraction=max_bad_fraction,
            **settings,
        )
    data = loaded[key]
    logits, embeddings = predict_split(model, data, batch_size=batch_size, device=dev)
    result = report_predictions(snap, data, logits, embeddings, resolve_threshold(threshold, snap))
    if gallery:
        crops = data.images[data.rows].numpy()
        probs = torch.sigmoid(logits).numpy()
        picture = error_gallery(
            crops, data.labels.numpy(), probs, result["overall"]["threshold"], result.get("per_source")
        )
        result["gallery"] = str(save_png(picture, gallery))
    return result


def report_predictions(
    snap: Snapshot, data: Split, logits: torch.Tensor, embeddings: torch.Tensor, threshold: float = 0.5
) -> dict:
    require_finite(logits, f"--checkpoint {snap.path}")
    labels = data.labels
    probs = torch.sigmoid(logits).numpy()

    def block(rows=None):
        sel = slice(None) if rows is None else torch.from_numpy(rows)
        report = full_report(labels[sel].numpy(), probs[sel if rows is None else rows], threshold)
        report["loss"] = (
            float(F.binary_cross_entropy_with_logits(logits[sel], labels[sel].float())) if len(labels[sel]) else None
        )
        report["fisher"] = fisher_ratio(embeddings[sel], labels[sel])
        return report

    result = {"checkpoint": str(snap.path), "origin": snap.origin, "split": data.name, "overall": block()}
    if data.sources is not None:
        # Group once (sort by source) instead of one mask per source: O(rows log rows), not O(rows x sources).
        names, inverse = np.unique(data.sources.astype(str), return_inverse=True)
        groups = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
        result["per_source"] = {str(name): block(rows) for name, rows in zip(names, groups)}
    return to_jsonable(result)


def format_eval(result: dict) -> str:
    cols = (
        "samples",
        "accuracy",
        "precision",
        "recall",
        "f1",
        "roc_auc",
        "pr_auc",
        "best_threshold",
        "best_f1",
        "fisher",
    )
    widths = [max(10, len(c)) for c in cols]

    def cell(value, width):
        if isinstance(value, float):
            return f"{value:>{width}.4f}"
        return f"{'n/a' if value is None else value:>{width}}"

    rows = [("overall", result["overall"])] + sorted((result.get("per_source") or {}).items())
    name_width = max(12, *(len(n) for n, _ in rows))
    lines = [
        f"checkpoint {result['checkpoint']} ({result['origin']}), split {result['split']}",
        f"{'':<{name_width}} " + " ".join(f"{c:>{w}}" for c, w in zip(cols, widths)),
    ]
    for name, rep in rows:
        lines.append(f"{name:<{name_width}} " + " ".join(cell(rep.get(c), w) for c, w in zip(cols, widths)))
    cm = result["overall"]["confusion_matrix"]
    lines.append(
        f"confusion matrix at threshold {result['overall']['threshold']:g}: "
        f"tn {cm['tn']}  fp {cm['fp']}  fn {cm['fn']}  tp {cm['tp']}"
    )
    return "\n".join(lines)


# --- compare ---------------------------------------------------------------------------------


def read_run(path: str) -> dict:
    """A run folder (summary/history/config) or a single checkpoint file -> one comparable record."""
    p = Path(path).expanduser()
    summary = _ocec_summary(p) if p.is_dir() else None
    if summary is not None:
        try:
            history = json.loads((p / "history.json").read_text()) if (p / "history.json").is_file() else []
        except (OSError, ValueError) as exc:
            raise UserError(f"compare {p}: unreadable history.json ({exc})") from None
        pretrain = (summary.get("pretrain") or {}).get("path")
        return {
            "name": str(p),
            "best_val_f1": summary.get("best_f1"),
            "best_epoch": summary.get("best_epoch"),
            "final_f1": summary["final_val_f1"]
            if summary.get("final_val_f1") is not None
            else summary.get("final_train_f1"),
            "best_fisher": summary.get("best_val_fisher"),
            "epochs": summary.get("epochs_completed"),
            "seconds": summary.get("wall_seconds"),
            "images_per_s": summary.get("images_per_s"),
            "pretrain": pretrain,
            "history": history,
            "best_checkpoint": summary.get("best_checkpoint") or str(p),
        }
    # a checkpoint file, or a folder of checkpoints without our summary (e.g. an upstream OCEC run)
    snap, _ = choose_best([str(p)], "compare")
    history = snap.history
    return {
        "name": str(p),
        "best_val_f1": snap.score,
        "best_epoch": snap.epoch,
        "final_f1": snap.metrics.get("f1"),
        "best_fisher": snap.metrics.get("fisher"),
        "epochs": snap.epoch,
        "seconds": None,
        "images_per_s": None,
        "pretrain": (snap.pretrain or {}).get("path"),
        "history": history,
        "best_checkpoint": str(snap.path),
    }


def run_label(path: str) -> str:
    """'runs/finetune_b/v3' -> 'finetune_b/v3': short, yet tells v1 of one output folder from another's."""
    parts = Path(path).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else path


def _ocec_summary(folder: Path) -> dict | None:
    """An ocec run folder's summary.json, or None if the folder is not one of ours."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and "epochs_completed" in summary else None


def compare_runs(
    paths: list[str], *, data_root: str | None = None, split: str = "val", plot: str | None = None, **data_options
) -> list[dict]:
    """One record per run (best/final F1, epochs, speed...). With `data_root`, every run's best checkpoint
    is also evaluated on the same rows: data without a 'split' column is split once, as the first run
    that records how it split (or with the defaults), for all runs."""
    records = [read_run(p) for p in paths]
    if plot:
        from ..core.plots import plot_runs

        drawable = [(run_label(r["name"]), r["history"]) for r in records if r["history"]]
        if not drawable:
            raise UserError("--plot: none of the runs has a per-epoch history to draw")
        out, lines = plot_runs(drawable, Path(plot))
        log.info("plot: %s (%d lines)", out, lines)
    if data_root:
        configs = (choose_best([r["best_checkpoint"]], "compare")[0].train_config for r in records)
        settings = split_settings_of(next((c for c in configs if c), {}))
        log.info(
            "compare: every run is scored on the same rows (%s split; data without a split column is split "
            "with seed %d, ratios %s)",
            split,
            settings["seed"],
            "/".join(f"{r:g}" for r in settings["ratios"]),
        )
        loaded: dict = {}
        for record in records:
            result = evaluate_checkpoint(
                [record["best_checkpoint"]],
                data_root,
                split=split,
                split_settings=settings,
                loaded=loaded,
                **data_options,
            )
            record["data_f1"] = result["overall"]["f1"]
            record["data_roc_auc"] = result["overall"]["roc_auc"]
            record["data_fisher"] = result["overall"]["fisher"]
    return records


def format_compare(records: list[dict], with_data: bool) -> str:
    cols = [
        ("best_val_f1", "best val F1"),
        ("best_epoch", "epoch"),
        ("final_f1", "final F1"),
        ("best_fisher", "fisher"),
        ("epochs", "epochs"),
        ("seconds", "wall s"),
        ("images_per_s", "img/s"),
    ]
    if with_data:
        cols += [("data_f1", "F1 on data"), ("data_roc_auc", "AUC on data"), ("data_fisher", "fisher on data")]
    name_width = max(10, *(len(r["name"]) for r in records))

    def cell(key, value, width):
        if isinstance(value, float):
            return f"{value:>{width}.1f}" if key in ("seconds", "images_per_s") else f"{value:>{width}.4f}"
        return f"{'-' if value is None else value:>{width}}"

    lines = [f"{'run':<{name_width}} " + " ".join(f"{t:>{max(8, len(t))}}" for _, t in cols) + "  pretrain"]
    for r in records:
        lines.append(
            f"{r['name']:<{name_width}} "
            + " ".join(cell(k, r.get(k), max(8, len(t))) for k, t in cols)
            + f"  {r.get('pretrain') or '-'}"
        )
    return "\n".join(lines)


# --- predict -----------------------------------------------------------------------------------
