"""`ocec audit`: find the wrong labels of a dataset by confident learning (Northcutt et al., JAIR 2021).

Every labelled row (train, val and test alike) is predicted by a model that never saw it: K-fold
cross-fitting, folds grouped by `source` where the column exists (crops of one person or video stay in one
fold) and stratified by class. Each fold's model is a normal `ocec train` run (the flags given to the audit:
--pretrain, architecture, recipe, epochs) on the other folds, with a seeded tenth of them as its val split
for best-epoch selection; the best checkpoint then predicts the held-out fold. cleanlab ranks the rows by
those out-of-fold probabilities (`cleanlab.filter.find_label_issues`, by self-confidence).

OUT/folds.npy            the fold of every row (-1: not audited), fixed at the first run
OUT/fold_K/              the fold's training run (vN) and oof.npz: its rows and their probability of open
OUT/label_issues.csv     flagged rows, most suspicious first: rank, image_path, split, source, label,
                         prob_open (out of fold), self_confidence (the probability of the given label)
OUT/out_of_fold.csv      every audited row with the same columns (flagged: 0/1)
OUT/summary.json         flagged share per class, split and source; counts; how folds were made
OUT/suspects.png         the top suspects per given class, captioned with the out-of-fold probability

A fold whose oof.npz exists is done: a killed audit, run again, trains only the folds it lacks.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..core.fileio import atomic_write, write_json_atomic
from ..data.decode import cache_location, load_decoded
from ..data.parquet import SPLITS, read_rows
from ..engine.rundir import latest_run_dir
from .gallery import save_png, sheet, stack
from .sweep import pick_device

log = logging.getLogger("ocec")
INNER_VAL = 0.1  # share of a fold's training rows kept as its val split (best epoch and threshold)


def require_cleanlab():
    try:
        import cleanlab.filter
    except ImportError:
        raise UserError("ocec audit needs cleanlab: pip install 'ocec[audit]'") from None
    return cleanlab


def assign_folds(labels: np.ndarray, groups: np.ndarray | None, audited: np.ndarray, folds: int, seed: int):
    """The fold of every row (-1 where not audited) -> (folds, whether they are grouped by source)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    idx = np.flatnonzero(audited)
    y = labels[idx]
    if min(np.bincount(y, minlength=2)) < folds:
        raise UserError(f"--folds {folds}: each class needs at least {folds} labelled rows (has {np.bincount(y)})")
    grouped = groups is not None and len(np.unique(groups[idx])) >= folds
    if grouped:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        parts = splitter.split(idx, y, groups[idx])
    else:
        parts = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(idx, y)
    fold_of = np.full(len(labels), -1, dtype=np.int8)
    for k, (_, held_out) in enumerate(parts):
        fold_of[idx[held_out]] = k
    return fold_of, grouped


def fold_split_codes(fold_of: np.ndarray, labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Split codes of fold k's training run: the held-out fold as its test split, a seeded stratified tenth
    of the other folds as val, the rest train; rows not audited are left out."""
    codes = np.full(len(fold_of), -1, dtype=np.int8)
    codes[fold_of == k] = SPLITS.index("test")
    rng = np.random.default_rng([seed, k])
    for cls in (0, 1):
        rows = np.flatnonzero((fold_of >= 0) & (fold_of != k) & (labels == cls))
        val = rng.permutation(rows)[: max(1, int(round(INNER_VAL * len(rows))))]
        codes[rows] = SPLITS.index("train")
        codes[val] = SPLITS.index("val")
    return codes


def run_audit(
    *,
    data_root: str,
    output_dir: str,
    folds: int,
    n_jobs: int,
    devices: list[str],
    train_flags: list[str],
    seed: int,
    cache_dir: str | None,
    no_cache: bool,
    batch_size: int,
    filter_by: str = "prune_by_noise_rate",
) -> dict:
    cleanlab = require_cleanlab()
    out = Path(output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    rows = read_rows(data_root)
    in_split = rows.split_codes >= 0 if rows.split_codes is not None else np.ones(len(rows), bool)
    audited = in_split & (rows.labels >= 0)
    fold_file = out / "folds.npy"
    if fold_file.exists():  # a rerun continues the same folds
        fold_of = np.load(fold_file)
        meta = json.loads((out / "folds.json").read_text())
        if len(fold_of) != len(rows) or meta["folds"] != folds:
            raise UserError(
                f"--output_dir {out}: holds an audit of {len(fold_of)} rows in {meta['folds']} folds, not "
                f"{len(rows)} rows in {folds}: use another --output_dir"
            )
        grouped = meta["grouped_by_source"]
    else:
        fold_of, grouped = assign_folds(rows.labels, rows.source_codes, audited, folds, seed)
        atomic_write(fold_file, lambda f: np.save(f, fold_of))
        write_json_atomic(out / "folds.json", {"folds": folds, "grouped_by_source": grouped, "seed": seed})
    log.info(
        "audit: %d labelled rows in %d folds (%s), %d done before",
        int(audited.sum()),
        folds,
        "grouped by source, stratified by class" if grouped else "stratified by class",
        sum((out / f"fold_{k}" / "oof.npz").exists() for k in range(folds)),
    )
    todo = [k for k in range(folds) if not (out / f"fold_{k}" / "oof.npz").exists()]
    train_folds(
        out, todo, fold_of, rows.labels, data_root, train_flags, seed, n_jobs, devices, cache_dir, no_cache, batch_size
    )

    prob = np.full(len(rows), np.nan)
    for k in range(folds):
        with np.load(out / f"fold_{k}" / "oof.npz") as saved:
            prob[saved["rows"]] = saved["prob_open"]
            size = tuple(int(v) for v in saved["image_size"])
    idx = np.flatnonzero(audited)
    labels, p = rows.labels[idx], prob[idx]
    pred_probs = np.stack([1.0 - p, p], axis=1)
    ranked = cleanlab.filter.find_label_issues(
        labels, pred_probs, filter_by=filter_by, return_indices_ranked_by="self_confidence"
    )
    cache = cache_location(cache_dir, no_cache)
    ranked = np.asarray(ranked, dtype=np.int64)
    summary = write_results(out, rows, idx, labels, p, ranked, data_root, grouped)
    summary["suspects"] = str(
        suspects_picture(idx, labels, p, ranked, load_decoded(data_root, size, num_workers=0, cache_dir=cache), out)
    )
    return summary


def train_folds(out, todo, fold_of, labels, data_root, train_flags, seed, n_jobs, devices, cache_dir, no_cache, batch):
    """Each fold's training run in its own process, up to n_jobs at once; then its out-of-fold predictions."""
    pending, running = list(todo), []
    while pending or running:
        while pending and len(running) < n_jobs:
            k = pending.pop(0)
            folder = out / f"fold_{k}"
            folder.mkdir(exist_ok=True)
            codes = folder / "split_codes.npy"
            atomic_write(codes, lambda f, k=k: np.save(f, fold_split_codes(fold_of, labels, k, seed)))
            device = pick_device(devices, [d for _, _, d in running])
            command = [sys.executable, "-m", "ocec", "train", "--data_root", str(data_root), *train_flags]
            command += ["--split_codes", str(codes), "--output_dir", str(folder)]
            command += ["--device", device] if device else []
            with open(folder / "stderr.log", "wb") as errors:
                process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, env={**os.environ})
            log.info("audit: fold %d training (%s)", k, folder)
            running.append((k, process, device))
        time.sleep(0.2)
        for entry in list(running):
            k, process, device = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            folder = out / f"fold_{k}"
            if process.returncode != 0:
                for _, other, _ in running:
                    other.terminate()
                text = (folder / "stderr.log").read_text(errors="replace").strip().splitlines()
                raise UserError(f"audit: fold {k} failed (exit {process.returncode}): {(text or [''])[-1][:300]}")
            predict_fold(folder, fold_of == k, data_root, device, cache_dir, no_cache, batch)


def predict_fold(folder: Path, held_out: np.ndarray, data_root, device, cache_dir, no_cache, batch_size) -> None:
    import torch

    from ..data.dataset import Split
    from ..engine.inference import predict_split
    from ..engine.runtime import resolve_device
    from ..finetune.pretrained import load_for_inference

    dev = resolve_device(device or "auto")
    model, snap, _ = load_for_inference([str(latest_run_dir(folder))], dev)
    decoded = load_decoded(
        data_root, snap.model_config.image_size, num_workers=0, cache_dir=cache_location(cache_dir, no_cache)
    )
    rows = np.flatnonzero(held_out)
    split = Split(
        "fold", torch.from_numpy(decoded.images), torch.from_numpy(rows), torch.zeros(len(rows), dtype=torch.long)
    )
    logits, _ = predict_split(model, split, batch_size=batch_size, device=dev)
    prob = torch.sigmoid(logits).numpy().astype(np.float64)
    size = np.asarray(snap.model_config.image_size)  # the size the suspects are shown at
    atomic_write(folder / "oof.npz", lambda f: np.savez(f, rows=rows, prob_open=prob, image_size=size))
    log.info("audit: fold %s predicted %d held-out rows with %s", folder.name, len(rows), snap.path.name)


def write_results(out, rows, idx, labels, p, ranked, data_root, grouped) -> dict:
    from ..data.edits import image_paths_of

    try:
        paths = image_paths_of(data_root)
    except UserError:  # no image_path column: name rows by file and row
        paths = np.asarray([rows.where(i) if rows.files else str(i) for i in range(len(rows))], dtype=object)
    split_names = np.asarray(SPLITS, dtype=object)[rows.split_codes[idx]] if rows.split_codes is not None else None
    sources = rows.sources(idx)
    confidence = np.where(labels == 1, p, 1.0 - p)
    rank = np.zeros(len(idx), dtype=np.int64)
    rank[ranked] = np.arange(1, len(ranked) + 1)
    columns = ["rank", "image_path", "split", "source", "label", "prob_open", "self_confidence"]

    def record(j: int) -> list:
        return [
            int(rank[j]) or "",
            paths[idx[j]],
            split_names[j] if split_names is not None else "",
            sources[j] if sources is not None else "",
            ("closed", "open")[labels[j]],
            f"{p[j]:.6f}",
            f"{confidence[j]:.6f}",
        ]

    def write_csv(path: Path, order, extra=None):
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns + ([extra] if extra else []))
        for j in order:
            writer.writerow(record(j) + ([int(rank[j] > 0)] if extra else []))
        atomic_write(path, lambda f: f.write(buffer.getvalue().encode()))

    write_csv(out / "label_issues.csv", ranked)
    write_csv(out / "out_of_fold.csv", range(len(idx)), "flagged")
    flagged = rank > 0

    def share(mask: np.ndarray) -> dict:
        return {"rows": int(mask.sum()), "flagged": int((flagged & mask).sum()), "share": float(flagged[mask].mean())}

    summary = {
        "rows_audited": int(len(idx)),
        "flagged": int(flagged.sum()),
        "estimated_wrong_share": float(flagged.mean()),
        "per_class": {name: share(labels == c) for c, name in enumerate(("closed", "open")) if (labels == c).any()},
        "per_split": {
            s: share(split_names == s) for s in SPLITS if split_names is not None and (split_names == s).any()
        },
        "per_source": {str(s): share(sources == s) for s in np.unique(sources)} if sources is not None else {},
        "folds_grouped_by_source": bool(grouped),
        "out_of_fold_f1_note": "probabilities from models that never saw the row",
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


def suspects_picture(idx, labels, p, ranked, decoded, out: Path, per_class: int = 24) -> Path:
    """The most suspicious rows of each given class, as contact sheets (images as the fold models saw them)."""
    size = decoded.images.shape[2:]
    parts = []
    for c, name in enumerate(("closed", "open")):
        top = [j for j in ranked if labels[j] == c][:per_class]
        crops = np.asarray(decoded.images[idx[top]]) if top else np.zeros((0, 3, *size), np.uint8)
        captions = [f"#{k + 1} given {name}\np(open) {p[j]:.3f}" for k, j in enumerate(top)]
        parts.append(sheet(f"labelled {name}, most likely wrong (rank, out-of-fold probability)", crops, captions))
    return save_png(stack(parts), out / "suspects.png")
