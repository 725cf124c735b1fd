"""`ocec soup`: average the weights of runs fine-tuned from one starting point (model soups, Wortsman et al.
2022), or the last K epochs of one run, or interpolate model A and a fine-tune (WiSE-FT, Wortsman et al.
2022b). Averaging uses torch.optim.swa_utils.AveragedModel; the BatchNorm statistics of every average are
then re-estimated on B's train images, augmented as the ingredients were trained (averaged statistics do
not belong to averaged weights). The result is a normal training checkpoint: eval, export, predict and
--pretrain read it.

uniform   every ingredient, equally
greedy    ingredients by their own val F1, best first; each is kept only if the soup's val F1 does not drop
wise_ft   (1 - alpha) * A + alpha * fine-tune for alpha in 0, 0.1, .., 1, chosen by B's val F1 (with
          --data_root_a, A's val F1 at each alpha too: how much of A is kept)
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel

from ..core.config import TrainConfig
from ..core.errors import UserError
from ..core.fileio import to_jsonable, write_json_atomic
from ..core.progress import fmt
from ..data.dataset import load_dataset
from ..data.decode import cache_location
from ..engine.batchnorm import BN_ADAPT_IMAGES, adapt_batchnorm, reestimate_as_trained
from ..engine.checkpoint import EPOCH_RE, save_checkpoint, training_payload
from ..engine.inference import evaluate_split
from ..engine.runtime import amp_dtype, resolve_device
from ..finetune.pretrained import Snapshot, choose_best, load_pretrained_state, read_snapshot
from ..models.model import build_model
from .evaluate import split_settings_of

log = logging.getLogger("ocec")
STRUCTURE = ("arch_variant", "base_channels", "num_blocks", "head_variant", "image_size", "margin_method")
BN_IMAGES = TrainConfig.precise_bn  # images for the statistics, as --precise_bn's default


def ingredients(runs: list[str], last: int | None) -> list[Snapshot]:
    """The best checkpoint of each run, or the last `last` epoch checkpoints of the one run."""
    if last:
        if len(runs) != 1 or not Path(runs[0]).is_dir():
            raise UserError("--last K averages the epochs of one run: give exactly one run folder")
        epochs = sorted(p for p in Path(runs[0]).iterdir() if EPOCH_RE.match(p.name))
        if len(epochs) < 2:
            raise UserError(f"--last {last}: {runs[0]} keeps {len(epochs)} epoch checkpoint(s) (see --keep_last)")
        return [read_snapshot(p, "soup") for p in epochs[-last:]]
    return [choose_best([run], "soup")[0] for run in runs]


def structure_differences(a, b) -> list[str]:
    """The structural settings in which two model configs differ (averaging needs none)."""
    return [f for f in STRUCTURE if getattr(a, f) != getattr(b, f)]


def check_compatible(snaps: list[Snapshot], same_run: bool) -> None:
    """One architecture, and one starting point (the same --pretrain): otherwise averaging is meaningless."""
    first = snaps[0].model_config
    for snap in snaps[1:]:
        differs = structure_differences(snap.model_config, first)
        if differs:
            raise UserError(f"soup: {snap.path} has another architecture than {snaps[0].path} ({', '.join(differs)})")
    if same_run:
        return
    starts = {(s.pretrain or {}).get("path") for s in snaps}
    if None in starts or len(starts) > 1:
        names = ", ".join(
            f"{s.path.parent.name}/{s.path.name}: {(s.pretrain or {}).get('path', 'from scratch')}" for s in snaps
        )
        raise UserError(f"soup: the runs do not share a starting point (--pretrain): {names}")


class Judge:
    """Builds a model from weights, re-estimates its BatchNorm statistics on B's train images, scores it."""

    def __init__(self, snap: Snapshot, data_root: str, data_root_a: str | None, device, batch_size: int, cache):
        self.device, self.batch_size, self.cfg, self.reference = device, batch_size, snap.model_config, snap
        split = split_settings_of(snap.train_config)  # data without a split column: split as the run did
        options = dict(**split, num_workers=0, cache_dir=cache, max_bad_fraction=0.01)
        data = load_dataset(data_root, self.cfg.image_size, **options)
        self.train, self.val, self.test = data.get("train"), data.get("val"), data.get("test")
        if self.train is None or self.val is None:
            raise UserError(f"--data_root {data_root}: a soup needs train (BatchNorm) and val (selection) splits")
        self.val_a = load_dataset(data_root_a, self.cfg.image_size, **options).get("val") if data_root_a else None

    def model(self, state: dict, like: Snapshot | None = None) -> torch.nn.Module:
        """The weights with BatchNorm statistics re-estimated as training's precise BN takes them (on train
        images augmented as in training, with the seed, image count and batch size of `like`'s run and epoch;
        by default the reference ingredient's: the first, or a greedy soup's best), so one ingredient judged
        here scores what its run logged. Measured on style c: re-estimated on plain images instead,
        ingredients lost up to 0.015 val F1."""
        like = like or self.reference
        cfg = TrainConfig.from_dict(like.train_config) if like.train_config else TrainConfig()
        model = build_model(self.cfg)
        model.load_state_dict(state)
        model.to(self.device)
        common = dict(batch_size=cfg.batch_size, device=self.device)
        if not like.epoch:  # a --pretrain start (epoch 0): --bn_adapt's plain images
            adapt_batchnorm(model, self.train, **common, max_images=BN_ADAPT_IMAGES, seed=cfg.seed)
            return model.eval()
        reestimate_as_trained(
            model,
            self.train,
            augment_level=cfg.augment,
            seed=cfg.seed + like.epoch,
            max_images=cfg.precise_bn or BN_IMAGES,
            batch_size=cfg.batch_size,
            device=self.device,
            amp_dtype=amp_dtype(self.device, cfg.use_amp),
        )
        return model.eval()

    def score(self, model, split=None) -> dict:
        report, _ = evaluate_split(model, split or self.val, batch_size=self.batch_size, device=self.device)
        return report


def average(states: list[dict], cfg) -> dict:
    """The mean of state dicts (parameters and floating buffers), by swa_utils.AveragedModel."""
    models = []
    for state in states:
        model = build_model(cfg)
        model.load_state_dict(state)
        models.append(model)
    soup = AveragedModel(models[0], use_buffers=True)
    for model in models[1:]:
        soup.update_parameters(model)
    return copy.deepcopy(soup.module.state_dict())


def interpolate(a: dict, b: dict, alpha: float) -> dict:
    return {k: (1 - alpha) * a[k] + alpha * b[k] if a[k].is_floating_point() else b[k] for k in b}


def make_soup(
    runs: list[str],
    *,
    data_root: str,
    output_dir: str,
    method: str = "greedy",
    last: int | None = None,
    wise_ft: str | None = None,
    data_root_a: str | None = None,
    device: str = "auto",
    batch_size: int = 256,
    cache_dir: str | None = None,
) -> dict:
    snaps = ingredients(runs, last)
    check_compatible(snaps, same_run=bool(last))
    dev = resolve_device(device)
    judge = Judge(snaps[0], data_root, data_root_a, dev, batch_size, cache_location(cache_dir))
    result = {"method": "wise_ft" if wise_ft else method, "ingredients": [], "kept": []}
    scored = []
    for snap in snaps:  # each ingredient's BatchNorm re-estimated once, then judged on val and test
        model = judge.model(snap.state, like=snap)
        f1 = judge.score(model)["f1"]
        test = judge.score(model, judge.test)["f1"] if judge.test is not None else None
        scored.append((f1, snap))
        result["ingredients"].append({"path": str(snap.path), "val_f1": f1, "test_f1": test})
        log.info("ingredient %s: val F1 %s", snap.path, fmt(f1))
    if wise_ft:
        state, report = wise_ft_path(judge, wise_ft, average([s.state for s in snaps], judge.cfg), result)
    elif method == "uniform" or len(snaps) == 1:
        state = average([s.state for s in snaps], judge.cfg)
        result["kept"] = [str(s.path) for s in snaps]
        report = judge.score(judge.model(state))
    else:
        state, report = greedy(judge, sorted(scored, key=lambda t: -t[0]), result)
    model = judge.model(state)  # BatchNorm re-estimated: what is saved is what was scored
    result["val_f1"] = report["f1"]
    if judge.test is not None:
        result["test_f1"] = judge.score(model, judge.test)["f1"]
        tests = [i["test_f1"] for i in result["ingredients"] if i["test_f1"] is not None]
        result["ingredients_mean_test_f1"] = sum(tests) / len(tests)
    out = Path(output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    first = snaps[0]
    payload = training_payload(
        model_cfg=first.model_config,
        train_cfg=TrainConfig.from_dict(first.train_config) if first.train_config else TrainConfig(),
        states={"model_state": model.state_dict()},
        record={"history": [], "best": {}, "pretrain": first.pretrain, "soup": to_jsonable(result)},
        epoch=0,
        metrics={"val": report},
        score=report["f1"],
        threshold=report.get("best_threshold"),
    )
    path = save_checkpoint(out / f"ocec_soup_{result['method']}_f1_{report['f1']:.4f}.pt", payload)
    result["checkpoint"] = str(path)
    write_json_atomic(out / "soup.json", to_jsonable(result))
    return result


def greedy(judge: Judge, ranked: list, result: dict) -> tuple[dict, dict]:
    kept = [ranked[0][1]]
    judge.reference = kept[0]  # every average's statistics as the best ingredient's run takes them
    best = judge.score(judge.model(kept[0].state))
    for _, snap in ranked[1:]:
        trial = average([s.state for s in [*kept, snap]], judge.cfg)
        report = judge.score(judge.model(trial))
        if report["f1"] >= best["f1"]:
            kept.append(snap)
            best = report
        log.info(
            "greedy soup: %s %s (val F1 %s)", "added" if kept[-1] is snap else "left out", snap.path, fmt(report["f1"])
        )
    result["kept"] = [str(s.path) for s in kept]
    return average([s.state for s in kept], judge.cfg), best


def wise_ft_path(judge: Judge, start: str, tuned: dict, result: dict) -> tuple[dict, dict]:
    snap_a, _ = choose_best([start], "--wise_ft")
    differs = structure_differences(snap_a.model_config, judge.cfg)
    if differs:
        raise UserError(f"--wise_ft {snap_a.path}: another architecture than the fine-tune ({', '.join(differs)})")
    model_a = build_model(judge.cfg)
    load_pretrained_state(model_a, snap_a, "--wise_ft")
    a_state = model_a.state_dict()
    best = None
    result["alphas"] = []
    for alpha in [i / 10 for i in range(11)]:
        state = interpolate(a_state, tuned, alpha)
        model = judge.model(state)
        report = judge.score(model)
        row = {"alpha": alpha, "val_f1": report["f1"]}
        if judge.val_a is not None:
            row["a_val_f1"] = judge.score(model, judge.val_a)["f1"]
        result["alphas"].append(row)
        log.info(
            "WiSE-FT alpha %.1f: B val F1 %s%s",
            alpha,
            fmt(report["f1"]),
            f", A val F1 {fmt(row['a_val_f1'])}" if "a_val_f1" in row else "",
        )
        if best is None or report["f1"] > best[1]["f1"]:
            best = (state, report, alpha)
    result["alpha"] = best[2]
    return best[0], best[1]
