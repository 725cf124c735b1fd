"""Atomic writes end with the mode a plain open() gives: runs are shared on common servers."""

from __future__ import annotations

import os
import stat

import pytest

from conftest import TINY, only_run
from ocec.core.fileio import atomic_write


@pytest.fixture
def umask():
    def set_mask(mask):
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path, umask, mask):
    umask(mask)
    atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
    (tmp_path / "b.bin").write_bytes(b"x")
    assert mode(tmp_path / "a.bin") == mode(tmp_path / "b.bin") == 0o666 & ~mask


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_output_of_a_run_is_readable_as_the_umask_allows(ocec, train, data_a, tmp_path, umask, mask):
    umask(mask)
    assert train(data_a, tmp_path / "runs", 1, *TINY).code == 0
    run = only_run(tmp_path / "runs")
    evaluated = ocec("eval", "--checkpoint", run, "--data_root", data_a, "--json", tmp_path / "e.json")
    assert evaluated.code == 0
    assert ocec("export", "--checkpoint", run, "--output", tmp_path / "m.onnx").code == 0
    outputs = [p for p in run.rglob("*") if p.is_file()] + [tmp_path / "e.json", tmp_path / "m.onnx"]
    assert {p.suffix for p in outputs} >= {".pt", ".json", ".csv", ".log", ".onnx"}
    wrong = {str(p.relative_to(tmp_path)): oct(mode(p)) for p in outputs if mode(p) != 0o666 & ~mask}
    assert not wrong
