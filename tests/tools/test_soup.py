"""`ocec soup`: uniform and greedy soups of fine-tunes from one A, the last K epochs of a run, WiSE-FT."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, TINY_TRAIN, checkpoint, only_run


@pytest.fixture(scope="module")
def fine_tunes(tmp_path_factory, data_b, trained_run):
    """Two fine-tunes of the same A on B with other seeds."""
    from ocec.cli import main

    runs = []
    for seed in (1, 2):
        out = tmp_path_factory.mktemp(f"ft{seed}")
        args = ["train", "--data_root", data_b, "--output_dir", out, "--epochs", 2, *TINY_TRAIN]
        assert main([str(a) for a in [*args, "--pretrain", trained_run, "--seed", seed]]) == 0
        runs.append(only_run(out))
    return runs


def test_a_soup_is_a_normal_checkpoint_scored_as_saved(ocec, fine_tunes, data_b, tmp_path):
    result = ocec("soup", *fine_tunes, "--data_root", data_b, "--output_dir", tmp_path, "--method", "uniform")
    assert result.code == 0, result.err
    soup = json.loads((tmp_path / "soup.json").read_text())
    assert len(soup["kept"]) == 2 and len(soup["ingredients"]) == 2 and "test_f1" in soup
    report = tmp_path / "e.json"
    assert ocec("eval", "--checkpoint", soup["checkpoint"], "--data_root", data_b, "--json", report).code == 0
    assert json.loads(report.read_text())["overall"]["f1"] == pytest.approx(soup["val_f1"], abs=1e-6)
    assert ocec("export", "--checkpoint", soup["checkpoint"], "--output", tmp_path / "s.onnx").code == 0
    again = ocec(
        "train",
        "--data_root",
        data_b,
        "--output_dir",
        tmp_path / "ft",
        "--epochs",
        1,
        *TINY_TRAIN,
        "--pretrain",
        soup["checkpoint"],
    )
    assert again.code == 0, again.err


def test_one_ingredient_is_judged_exactly_as_its_run_judged_it(ocec, fine_tunes, data_b, tmp_path):
    """BatchNorm statistics re-estimated as the run took them (precise BN: augmented train images with the
    run's seed, epoch and batch size; the --pretrain start: --bn_adapt's plain images): a soup of one
    checkpoint holds that checkpoint's statistics and scores its logged val F1."""
    for name in ("ocec_epoch_0002.pt", "ocec_best_epoch0000_*.pt"):
        path = next(fine_tunes[0].glob(name))
        out = tmp_path / path.stem
        result = ocec("soup", path, "--data_root", data_b, "--output_dir", out, "--method", "uniform")
        assert result.code == 0, result.err
        soup = json.loads((out / "soup.json").read_text())
        original = checkpoint(path)
        assert soup["val_f1"] == pytest.approx(original["metrics"]["val"]["f1"], abs=1e-9)
        saved = checkpoint(soup["checkpoint"])["model_state"]
        stats = [k for k in original["model_state"] if k.endswith(("running_mean", "running_var"))]
        assert stats and all(torch.allclose(saved[k], original["model_state"][k], atol=1e-6) for k in stats)


def test_a_greedy_soup_never_scores_below_its_best_ingredient(ocec, fine_tunes, data_b, tmp_path):
    assert ocec("soup", *fine_tunes, "--data_root", data_b, "--output_dir", tmp_path).code == 0
    soup = json.loads((tmp_path / "soup.json").read_text())
    assert soup["method"] == "greedy" and soup["val_f1"] >= max(i["val_f1"] for i in soup["ingredients"])


def test_runs_without_a_common_start_or_architecture_are_refused_naming_them(
    ocec, train, trained_run, fine_tunes, data_b, tmp_path
):
    assert train(data_b, tmp_path / "scratch", 1, *TINY).code == 0
    scratch = only_run(tmp_path / "scratch")
    result = ocec("soup", fine_tunes[0], scratch, "--data_root", data_b, "--output_dir", tmp_path / "s")
    assert result.code == 2 and "do not share a starting point" in result.err and "from scratch" in result.err
    assert train(data_b, tmp_path / "wide", 1, *TINY_TRAIN, "--image_size", "16x32", "--base_channels", 16).code == 0
    wide = only_run(tmp_path / "wide")
    result = ocec("soup", fine_tunes[0], wide, "--data_root", data_b, "--output_dir", tmp_path / "s")
    assert result.code == 2 and "another architecture" in result.err and "base_channels" in result.err


def test_the_last_epochs_of_one_run_and_wise_ft_from_a(ocec, fine_tunes, trained_run, data_a, data_b, tmp_path):
    result = ocec("soup", fine_tunes[0], "--last", 2, "--data_root", data_b, "--output_dir", tmp_path / "last")
    assert result.code == 0, result.err
    assert len(json.loads((tmp_path / "last" / "soup.json").read_text())["ingredients"]) == 2
    result = ocec(
        "soup",
        fine_tunes[0],
        "--wise_ft",
        trained_run,
        "--data_root",
        data_b,
        "--data_root_a",
        data_a,
        "--output_dir",
        tmp_path / "wise",
    )
    assert result.code == 0, result.err
    soup = json.loads((tmp_path / "wise" / "soup.json").read_text())
    alphas = soup["alphas"]
    assert [a["alpha"] for a in alphas] == [i / 10 for i in range(11)] and all("a_val_f1" in a for a in alphas)
    assert alphas[-1]["val_f1"] == pytest.approx(soup["ingredients"][0]["val_f1"])  # alpha 1: the fine-tune
    assert soup["val_f1"] == max(a["val_f1"] for a in alphas) and "WiSE-FT alpha" in result.out
