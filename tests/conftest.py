"""Shared fixtures: tiny synthetic parquet datasets made by `ocec.data.synth`, a tiny trained run, and
helpers that drive the real CLI (in-process for speed, as a subprocess where signals matter)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ocec.cli import main
from ocec.data.synth import write_synthetic

FIXTURES = Path(__file__).parent / "fixtures"
# Small enough that a 2-epoch run takes about a second on 2 CPU cores. The model flags are separate
# because a fine-tune inherits its architecture from the checkpoint.
TINY_MODEL = "--image_size 16x32 --base_channels 8 --num_blocks 2".split()
TINY_TRAIN = "--batch_size 32 --num_workers 0 --warmup_epochs 0 --device cpu --lr 3e-3".split()
TINY = TINY_MODEL + TINY_TRAIN


def pytest_report_header(config):
    """The machine's numerics, printed first: a failure on another CPU is read against these."""
    return (
        f"torch {torch.__version__} (git {torch.version.git_version[:10]}, cuda build {torch.version.cuda}), "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, oneDNN {torch.backends.mkldnn.is_available()}, "
        f"threads {torch.get_num_threads()} (tests use {min(2, torch.get_num_threads())})"
    )


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Never write to ~/.cache during tests."""
    os.environ["OCEC_CACHE_DIR"] = str(tmp_path_factory.mktemp("ocec-cache"))
    torch.set_num_threads(min(2, torch.get_num_threads()))


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def ocec(capsys):
    """Run `python -m ocec ...` in-process; returns exit code, stdout and stderr."""

    def run(*args) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def train(ocec):
    """`ocec train --data_root DATA --output_dir OUT --epochs EPOCHS EXTRA...`, in-process."""

    def run(data, out, epochs, *extra) -> Result:
        return ocec("train", "--data_root", data, "--output_dir", out, "--epochs", epochs, *extra)

    return run


def run_subprocess(*args, timeout=240, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ocec", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        **kwargs,
    )


def torchrun(*args, processes: int = 2, **kwargs) -> subprocess.Popen | subprocess.CompletedProcess:
    """`ocec train ARGS` under torchrun, `processes` processes on this machine (CPU, gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command += ["-m", "ocec", "train", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if kwargs.pop("background", False):
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, **kwargs)


def only_run(output_dir: Path) -> Path:
    runs = sorted(p for p in Path(output_dir).iterdir() if p.is_dir() and re.fullmatch(r"v\d+", p.name))
    assert len(runs) == 1, runs
    return runs[0]


def history(
    run_dir: Path,
    drop=("seconds", "wall_seconds", "images_per_s", "precise_bn_seconds", "teacher_seconds"),
    start: bool = False,
) -> list[dict]:
    """A run's trained epochs without their timings (which differ between identical runs); `start`: with the
    epoch-0 row a --pretrain run writes for its starting weights."""
    rows = json.loads((Path(run_dir) / "history.json").read_text())
    return [{k: v for k, v in r.items() if k not in drop} for r in rows if start or r["epoch"] > 0]


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def config(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "config.json").read_text())


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def data_a(tmp_path_factory) -> Path:
    return synth_folder(tmp_path_factory, "data_a", 240, seed=1, style="a")


@pytest.fixture(scope="session")
def data_b(tmp_path_factory) -> Path:
    return synth_folder(tmp_path_factory, "data_b", 240, seed=2, style="b")


def synth_folder(tmp_path_factory, name: str, rows: int, seed: int, style: str) -> Path:
    folder = tmp_path_factory.mktemp(name)
    write_synthetic(folder, rows, seed=seed, style=style)
    return folder


def train_once(tmp_path_factory, name: str, *args) -> Path:
    out = tmp_path_factory.mktemp(name)
    assert main(["train", "--output_dir", out, *args]) == 0
    return only_run(out)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_a) -> Path:
    """A 3-epoch tiny run on dataset A with the default cosface head (val F1 about 0.97)."""
    return train_once(tmp_path_factory, "trained", "--data_root", data_a, "--epochs", 3, *TINY, "--batch_size", 8)


@pytest.fixture
def finetune(train, data_a, trained_run, tmp_path):
    """A tiny CPU fine-tune of `trained_run` on dataset A into tmp_path: finetune(epochs, *extra_flags)."""

    def run(epochs, *extra) -> Result:
        return train(data_a, tmp_path, epochs, *TINY_TRAIN, "--pretrain", trained_run, *extra)

    return run


@pytest.fixture(scope="session")
def bce_run(tmp_path_factory, data_a) -> Path:
    """A 3-epoch tiny run with --margin_method none (a one-logit BCE model, like the upstream trainer's)."""
    return train_once(
        tmp_path_factory,
        "trained_bce",
        "--data_root",
        data_a,
        "--epochs",
        3,
        "--margin_method",
        "none",
        *TINY,
        "--batch_size",
        8,
    )
