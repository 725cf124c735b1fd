"""Two machines under torchrun, played on one: each "machine" is a torchrun agent with its own HOME (so
its own decode cache, as machines without a shared filesystem) and its own working folder (relative
paths: only machine 0 holds the run folder it writes)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import TINY, history, only_run

RECORDING_OCEC = Path(__file__).with_name("recording_ocec.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_machines(root: Path, *args, shared_cache: Path | None = None) -> tuple[list, Counter]:
    """`ocec train ARGS` as 2 machines x 2 processes -> (each machine's finished process, the recorded
    (event, machine) counts)."""
    record = root / "record.txt"
    record.unlink(missing_ok=True)
    port = free_port()
    procs = []
    for machine in (0, 1):
        home = root / f"home{machine}"
        home.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("OCEC_CACHE_DIR", "XDG_CACHE_HOME")}
        env.update(HOME=str(home), OCEC_RECORD=str(record), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        if shared_cache is not None:
            env["OCEC_CACHE_DIR"] = str(shared_cache)
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={machine}"]
        command += ["--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}"]
        command += [str(RECORDING_OCEC), "train", *map(str, args)]
        work = root / f"machine{machine}"
        procs.append(subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:  # a rank that waits for a peer that is gone
            for p in procs:
                p.kill()
            pytest.fail("a machine waited for the other past 300 s")
        done.append((proc.returncode, err.decode()))
    events = Counter(tuple(line.split()[:2]) for line in record.read_text().splitlines()) if record.exists() else {}
    return done, events


@pytest.fixture
def machines(tmp_path, data_a) -> Path:
    for machine in (0, 1):
        shutil.copytree(data_a, tmp_path / f"machine{machine}" / "data")  # each machine its own copy
    return tmp_path


def test_each_machine_decodes_once_and_a_resume_works_where_the_checkpoint_is_not(machines):
    flags = ["--data_root", "data", "--output_dir", "runs", *TINY]
    done, events = two_machines(machines, *flags, "--epochs", 2)
    assert [rc for rc, _ in done] == [0, 0], done[0][1][-3000:] + done[1][1][-3000:]
    # one decode per machine, by its first process; its second process maps it without a CRC pass
    assert events == {("decode", "0"): 1, ("decode", "1"): 1}, events
    run = only_run(machines / "machine0" / "runs")
    assert not (machines / "machine1" / "runs").exists()  # only the main process writes
    assert [r["epoch"] for r in history(run)] == [1, 2]

    # machine 1 has no runs/ folder: the main process reads the checkpoint and hands it over
    done, events = two_machines(machines, "--resume", "runs/v1", "--epochs", 3, "--data_root", "data")
    assert [rc for rc, _ in done] == [0, 0], done[0][1][-3000:] + done[1][1][-3000:]
    assert [r["epoch"] for r in history(run)] == [1, 2, 3]
    assert events == {("crc", "0"): 1, ("crc", "1"): 1}, events  # each cache checked once, on its machine


def test_a_shared_cache_is_decoded_once(machines, tmp_path_factory):
    shared = tmp_path_factory.mktemp("shared-cache")  # a shared filesystem: one data folder, one cache
    data = machines / "machine0" / "data"
    done, events = two_machines(
        machines, "--data_root", data, "--output_dir", "runs", *TINY, "--epochs", 1, shared_cache=shared
    )
    assert [rc for rc, _ in done] == [0, 0], done[0][1][-3000:] + done[1][1][-3000:]
    # machine 1's first process finds machine 0's entry and checks it
    assert events == {("decode", "0"): 1, ("crc", "1"): 1}, events


def test_other_data_on_another_machine_stops_every_process_with_one_line(machines):
    table = machines / "machine1" / "data" / "dataset.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(table).slice(0, 150), table)  # machine 1's copy lost rows
    done, _ = two_machines(machines, "--data_root", "data", "--output_dir", "runs", *TINY, "--epochs", 1)
    assert all(rc != 0 for rc, _ in done)
    ours = [line for _, err in done for line in err.splitlines() if line.startswith("ocec train: error:")]
    assert len(ours) == 1 and "read other data" in ours[0] and "process 2" in ours[0], ours
    assert not (machines / "machine0" / "runs").exists()
