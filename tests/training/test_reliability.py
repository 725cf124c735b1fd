"""Reliability: kills, signals, corrupted data, hostile checkpoints, full disks, NaNs.
(Bad flags and files, one case each, are in test_cli.py.)"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY, history, only_run, run_subprocess, summary, synth_folder

import ocec.training.trainer as trainer_mod
from ocec.data.parquet import read_rows
from ocec.data.sampling import steps_per_epoch

# Slow enough per epoch (about 100 steps) that a signal lands mid-run.
SLOW = [*TINY, "--batch_size", "4"]


@pytest.fixture(scope="module")
def signal_data(tmp_path_factory) -> Path:
    return synth_folder(tmp_path_factory, "signal_data", 500, seed=3, style="a")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, signal_data) -> Path:
    """An uninterrupted 5-epoch run, in a subprocess like the interrupted ones."""
    out = tmp_path_factory.mktemp("reference")
    result = run_subprocess("train", "--data_root", signal_data, "--output_dir", out, "--epochs", 5, *SLOW)
    assert result.returncode == 0, result.stderr
    return only_run(out)


def _start(signal_data, out, epochs=5):
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ocec",
            "train",
            "--data_root",
            str(signal_data),
            "--output_dir",
            str(out),
            "--epochs",
            str(epochs),
            *SLOW,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_for(path: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path.name} appeared: {proc.stderr.read()}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def _same_outcome(run: Path, reference: Path):
    assert history(run) == history(reference)
    keys = ("best_f1", "best_epoch", "epochs_completed", "final_val_f1")
    assert {k: summary(run)[k] for k in keys} == {k: summary(reference)[k] for k in keys}


def _complete_files(folder: Path):
    """Every file a reader would open is whole (temporary `.tmp-*` files are never read)."""
    for ckpt in folder.rglob("*.pt"):
        if not ckpt.name.startswith(".tmp-"):
            torch.load(ckpt, weights_only=True)
    for meta in folder.rglob("*.json"):
        if not meta.name.startswith(".tmp-"):
            json.loads(meta.read_text())


def _no_half_files(folder: Path):
    assert not list(folder.rglob(".tmp-*")), "temporary files left behind"
    _complete_files(folder)


def test_sigkill_after_the_second_epoch_then_resume_equals_an_uninterrupted_run(signal_data, reference, tmp_path):
    proc = _start(signal_data, tmp_path)
    _wait_for(tmp_path / "v1" / "ocec_epoch_0002.pt", proc)
    proc.kill()
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    run = tmp_path / "v1"
    _complete_files(run)  # a kill may leave a .tmp- file, never a half-written checkpoint or JSON
    result = run_subprocess("train", "--resume", run, "--epochs", 5)
    assert result.returncode == 0, result.stderr
    _same_outcome(run, reference)
    _no_half_files(run)  # the resumed run cleared what the kill left


def test_sigterm_mid_epoch_writes_a_resumable_checkpoint(signal_data, reference, tmp_path):
    proc = _start(signal_data, tmp_path)
    _wait_for(tmp_path / "v1" / "ocec_epoch_0001.pt", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "resume with: python -m ocec train --resume" in out and "Traceback" not in err
    run = tmp_path / "v1"
    _no_half_files(run)
    result = run_subprocess("train", "--resume", run, "--epochs", 5)
    assert result.returncode == 0, result.stderr
    _same_outcome(run, reference)


def test_a_signal_mid_epoch_resumes_exactly_where_it_stopped(ocec, data_a, tmp_path, monkeypatch):
    flags = ["--data_root", data_a, *TINY, "--batch_size", 8, "--epochs", 3]
    assert ocec("train", *flags, "--output_dir", tmp_path / "straight").code == 0
    calls = []
    real = trainer_mod.augment_batch

    def augment_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 30:  # a step inside epoch 2
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "augment_batch", augment_then_signal)
    result = ocec("train", *flags, "--output_dir", tmp_path / "stopped")
    assert result.code == 130 and "resume with" in result.out
    run = only_run(tmp_path / "stopped")
    interrupted = torch.load(run / "ocec_interrupted.pt", weights_only=True)
    per_epoch = steps_per_epoch(int((read_rows(data_a).split_codes == 0).sum()), 8)
    # the 30th step ran (epoch 2, step 30 - per_epoch), then the checkpoint was saved
    assert (interrupted["epoch"], interrupted["step"]) == (2, 30 - per_epoch)
    monkeypatch.setattr(trainer_mod, "augment_batch", real)
    assert ocec("train", "--resume", run, "--epochs", 3).code == 0
    _same_outcome(run, only_run(tmp_path / "straight"))
    assert not (run / "ocec_interrupted.pt").exists()


# --- corrupted data (fuzz) --------------------------------------------------------------------


def _corruptions(rng: np.random.Generator, table: pa.Table) -> list[tuple[str, object]]:
    n = table.num_rows
    names = table.column_names
    blobs = table.column("image_bytes").to_pylist()

    def with_column(name, values):
        return table.set_column(names.index(name), name, values)

    def garbage_bytes():
        out = list(blobs)
        for i in rng.choice(n, size=int(rng.integers(1, n)), replace=False):
            mode = rng.integers(3)
            out[i] = (
                rng.bytes(int(rng.integers(0, 64)))
                if mode == 0
                else out[i][: int(rng.integers(0, len(out[i])))]
                if mode == 1
                else None
            )
        return with_column("image_bytes", pa.array(out, pa.binary()))

    def nulls(name):
        values = table.column(name).to_pylist()
        for i in rng.choice(n, size=int(rng.integers(1, 5)), replace=False):
            values[i] = None
        return with_column(name, pa.array(values, table.schema.field(name).type))

    def swapped(a, b):
        cols = {c: table.column(c) for c in names}
        cols[a], cols[b] = cols[b], cols[a]
        return pa.table(cols)

    return [
        ("garbage image bytes", garbage_bytes()),
        ("nulls in class_id", nulls("class_id")),
        (
            "nulls in label and class_id",
            nulls("class_id").set_column(names.index("label"), "label", pa.array([None] * n, pa.string())),
        ),
        ("nulls in split", nulls("split")),
        ("nulls in source", nulls("source")),
        ("class_id as float", with_column("class_id", pa.array(np.array(table.column("class_id").to_pylist(), float)))),
        ("class_id out of range", with_column("class_id", pa.array(rng.integers(0, 4, n)))),
        ("label as bytes", with_column("label", pa.array([b"open"] * n)).drop_columns(["class_id"])),
        ("split as integers", with_column("split", pa.array(rng.integers(0, 3, n)))),
        ("swapped image_bytes and label", swapped("image_bytes", "label")),
        ("swapped split and source", swapped("split", "source")),
        (
            "image_path as integers",
            with_column("image_path", pa.array(rng.integers(0, 9, n))).drop_columns(["image_bytes"]),
        ),
        ("truncated file", "truncate"),
        ("flipped bytes in file", "flip"),
    ]


FUZZ_CASES = [
    "garbage image bytes",
    "nulls in class_id",
    "nulls in label and class_id",
    "nulls in split",
    "nulls in source",
    "class_id as float",
    "class_id out of range",
    "label as bytes",
    "split as integers",
    "swapped image_bytes and label",
    "swapped split and source",
    "image_path as integers",
    "truncated file",
    "flipped bytes in file",
]
MUST_FAIL, MUST_PASS = {"garbage image bytes"}, {"nulls in source"}


@pytest.mark.parametrize("case", FUZZ_CASES)
def test_fuzzed_parquet_never_crashes_or_leaves_half_files(ocec, data_a, tmp_path, case):
    rng = np.random.default_rng(1234 + FUZZ_CASES.index(case))
    source = data_a / "dataset.parquet"
    corrupted = dict(_corruptions(rng, pq.read_table(source)))[case]
    path = tmp_path / "case.parquet"
    if corrupted == "truncate":
        data = source.read_bytes()
        path.write_bytes(data[: int(rng.integers(8, len(data) - 8))])
    elif corrupted == "flip":
        data = bytearray(source.read_bytes())
        for j in rng.choice(len(data), size=200, replace=False):
            data[j] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        pq.write_table(corrupted, path)
    out = tmp_path / "out"
    result = ocec(
        "train", "--data_root", path, "--output_dir", out, *TINY, "--epochs", 1, "--cache_dir", tmp_path / "c"
    )
    assert result.code in (0, 2), (result.code, result.err)
    assert "Traceback" not in result.out + result.err
    if result.code == 2:
        assert len(result.err.strip().splitlines()) == 1, result.err
    if case in MUST_FAIL or case in MUST_PASS:
        assert result.code == (2 if case in MUST_FAIL else 0), result.err
    for folder in (out, tmp_path / "c"):
        if folder.exists():
            _no_half_files(folder)


# --- hostile checkpoints, full disks, non-finite training ---------------------------------------


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("flag", ["--pretrain", "--resume"])
def test_a_malicious_pickle_is_refused_and_runs_nothing(ocec, data_a, tmp_path, flag):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"model_state": _Exploit(marker), "model_config": {}}, evil)
    args = ["--data_root", data_a, "--output_dir", tmp_path / "out", *TINY] if flag == "--pretrain" else []
    result = ocec("train", *args, flag, evil)
    assert result.code == 2 and not marker.exists()
    assert "refused" in result.err and "could run code" in result.err and "posix.system" in result.err
    for command in (
        ["eval", "--checkpoint", evil, "--data_root", data_a],
        ["export", "--checkpoint", evil, "--output", tmp_path / "m.onnx"],
    ):
        assert ocec(*command).code == 2 and not marker.exists()


def test_a_full_disk_keeps_the_previous_checkpoint(ocec, data_a, tmp_path, monkeypatch):
    real_save = torch.save
    writes = []

    def filling_disk(obj, f, *args, **kwargs):
        writes.append(1)
        if len(writes) > 2:  # epochs 1 and 2 fit (a best file is a copy, not a save), then the disk is full
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", filling_disk)
    result = ocec("train", "--data_root", data_a, "--output_dir", tmp_path, *TINY, "--epochs", 3)
    assert result.code == 2
    assert "the disk is full" in result.err and "previous version of the file is untouched" in result.err
    run = only_run(tmp_path)
    _no_half_files(run)
    assert torch.load(run / "ocec_epoch_0001.pt", weights_only=True)["epoch"] == 1


def test_a_non_finite_step_is_skipped_and_training_continues(ocec, data_a, tmp_path, monkeypatch, caplog):
    from ocec.models.margin import CosFace

    real = CosFace.training_loss
    calls = []

    def sometimes_nan(self, *args, **kwargs):
        calls.append(1)
        loss, logit = real(self, *args, **kwargs)
        return (loss * float("nan"), logit) if len(calls) == 3 else (loss, logit)

    monkeypatch.setattr(CosFace, "training_loss", sometimes_nan)
    result = ocec("train", "--data_root", data_a, "--output_dir", tmp_path, *TINY, "--epochs", 1)
    assert result.code == 0, result.err
    assert "step 3: non-finite loss, step skipped (1 in a row)" in result.out
    state = torch.load(only_run(tmp_path) / "ocec_epoch_0001.pt", weights_only=True)["model_state"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_persistent_non_finite_steps_stop_with_checkpoints_intact(ocec, data_a, tmp_path, monkeypatch):
    from ocec.models.margin import CosFace

    real = CosFace.training_loss
    calls = []

    def nan_after_first_epoch(self, *args, **kwargs):
        calls.append(1)
        loss, logit = real(self, *args, **kwargs)
        return (loss * float("nan"), logit) if len(calls) > 6 else (loss, logit)  # 6 steps per epoch

    monkeypatch.setattr(CosFace, "training_loss", nan_after_first_epoch)
    result = ocec("train", "--data_root", data_a, "--output_dir", tmp_path, *TINY, "--epochs", 5, "--max_bad_steps", 4)
    assert result.code == 2 and "4 consecutive training steps were non-finite (epoch 2, step 4)" in result.err
    run = only_run(tmp_path)
    _no_half_files(run)
    assert torch.load(run / "ocec_epoch_0001.pt", weights_only=True)["epoch"] == 1
    assert list(run.glob("ocec_best_epoch0001_*.pt"))


def test_a_diverging_learning_rate_is_reported_early(ocec, data_a, tmp_path):
    result = ocec("train", "--data_root", data_a, "--output_dir", tmp_path, *TINY, "--epochs", 3, "--lr", 1e30)
    assert result.code == 2
    assert "non-finite" in result.err or "not finite" in result.err
    assert "learning rate" in result.err


def test_a_signal_before_the_first_step_of_an_epoch_resumes_that_epoch(ocec, data_a, tmp_path, monkeypatch):
    """An interrupt checkpoint at step 0 is an epoch not yet trained, not a finished one."""
    flags = ["--data_root", data_a, *TINY, "--epochs", 3]
    assert ocec("train", *flags, "--output_dir", tmp_path / "straight").code == 0
    real = trainer_mod.epoch_order
    calls = []

    def signal_while_epoch_2_starts(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # epoch 2 is being set up: the signal lands before its first step
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "epoch_order", signal_while_epoch_2_starts)
    result = ocec("train", *flags, "--output_dir", tmp_path / "stopped")
    assert result.code == 130
    run = only_run(tmp_path / "stopped")
    interrupted = torch.load(run / "ocec_interrupted.pt", weights_only=True)
    assert (interrupted["epoch"], interrupted["step"]) == (2, 0)
    monkeypatch.setattr(trainer_mod, "epoch_order", real)
    assert ocec("train", "--resume", run, "--epochs", 3).code == 0
    _same_outcome(run, only_run(tmp_path / "straight"))
