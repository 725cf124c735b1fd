"""Several processes under torchrun (CPU, gloo): one model, one run folder, whole-split metrics, and the
same weights as one process with the same global batch."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY, checkpoint, config, history, only_run, torchrun

from ocec.data.sampling import steps_per_epoch
from ocec.data.synth import write_synthetic
from ocec.engine.distributed import World, pad_order, shard_of
from ocec.finetune.pretrained import choose_best

# One process must see exactly the global batches the two see, so no sample may be padded or dropped:
# 128 train rows = 4 batches of 32. 33 val rows: one rank predicts a row more than the other.
EXACT = [*TINY, "--augment", "none", "--dropout", "0", "--balance", "none", "--seed", "5"]
# Float32 sums run in another order (the gradient all-reduce, BatchNorm statistics summed per rank);
# 8 steps leave differences of about 1e-6 in weights of magnitude up to 8.
WEIGHT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exact_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("exact")
    write_synthetic(folder, 180, seed=3, style="a")
    table = pq.read_table(folder / "dataset.parquet")
    splits = ["train"] * 128 + ["val"] * 33 + ["test"] * 19
    pq.write_table(
        table.set_column(table.schema.get_field_index("split"), "split", pa.array(splits)), folder / "dataset.parquet"
    )
    return folder


def test_two_processes_train_one_model_like_one_process(exact_data, train, ocec, tmp_path):
    result = torchrun("--data_root", exact_data, "--output_dir", tmp_path / "ddp", "--epochs", 2, *EXACT, "--sync_bn")
    assert result.returncode == 0, result.stderr
    run = only_run(tmp_path / "ddp")  # one run folder, written by the main process alone
    log = (run / "train.log").read_text()
    assert log.count("epoch 1/2 ") == 1 and log.count("run folder:") == 1
    assert "torchrun: 2 processes on cpu, global batch 32 (16 each), SyncBatchNorm" in log
    assert config(run)["processes"] == 2 and len(history(run)) == 2

    # validation metrics are over the whole split: one process evaluating the saved best checkpoint agrees
    best = next(run.glob("ocec_best_*.pt"))
    row = history(run)[checkpoint(best)["epoch"] - 1]
    assert ocec("eval", "--checkpoint", best, "--data_root", exact_data, "--json", tmp_path / "e.json").code == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())["overall"]
    for metric in ("loss", "f1", "roc_auc", "fisher"):
        assert evaluated[metric] == pytest.approx(row[f"val_{metric}"], abs=1e-6), metric

    # and the weights equal those of one process with the same global batch and seed
    assert train(exact_data, tmp_path / "one", 2, *EXACT).code == 0
    single = checkpoint(only_run(tmp_path / "one") / "ocec_epoch_0002.pt")["model_state"]
    double = checkpoint(run / "ocec_epoch_0002.pt")["model_state"]
    assert single.keys() == double.keys()  # saved unwrapped: loads with or without DDP
    assert _largest_difference(single, double) < WEIGHT_TOLERANCE
    epoch_1 = checkpoint(run / "ocec_epoch_0001.pt")["model_state"]
    assert _largest_difference(single, epoch_1) > 100 * WEIGHT_TOLERANCE  # the last epoch moved the weights


def _largest_difference(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_frozen_backbone_released_in_a_later_stage(exact_data, trained_run, train, tmp_path):
    flags = [*EXACT, "--pretrain", trained_run, "--freeze_backbone", "--unfreeze_backbone_epoch", 2]
    result = torchrun("--data_root", exact_data, "--output_dir", tmp_path / "ddp", "--epochs", 2, *flags, "--sync_bn")
    assert result.returncode == 0, result.stderr
    run = only_run(tmp_path / "ddp")
    assert [r["trainable_backbone_units"] for r in history(run)] == [0, 3]
    pretrained = choose_best([str(trained_run)])[0].state  # what --pretrain loads
    after = [checkpoint(run / f"ocec_epoch_000{e}.pt")["model_state"] for e in (1, 2)]
    conv = "backbone.stem.0.weight"
    assert torch.equal(after[0][conv], pretrained[conv])  # frozen in epoch 1
    # released in epoch 2, and trained on both processes' gradients: the wrapper was rebuilt for it
    assert train(exact_data, tmp_path / "one", 2, *flags).code == 0
    single = checkpoint(only_run(tmp_path / "one") / "ocec_epoch_0002.pt")["model_state"]
    assert _largest_difference(single, after[1]) < WEIGHT_TOLERANCE
    assert (after[1][conv] - pretrained[conv]).abs().max() > 10 * WEIGHT_TOLERANCE


def test_every_finetuning_option_at_once_trains_like_one_process(exact_data, data_b, trained_run, train, tmp_path):
    # pretrain with BN adaptation and its zero-shot report, stages released from the input side, EMA, L2-SP,
    # layer decay, hard-example mining, a mixed-in dataset, precise BN, an extra validation set, diagnostics
    flags = [*EXACT, "--pretrain", trained_run, "--stages", "1:0:1e-3,2:0.3:3e-3", "--unfreeze_from", "input"]
    flags += ["--bn_adapt", "--ema_decay", 0.5, "--l2sp", 0.01, "--layer_decay", 0.7, "--hard_mining", 0.25]
    flags += ["--mix_data_root", data_b, "--mix_ratio", 0.25, "--precise_bn", 64, "--extra_val_root", data_b]
    flags += ["--save_diagnostics", "--epochs", 3]
    result = torchrun("--data_root", exact_data, "--output_dir", tmp_path / "ddp", *flags, "--sync_bn")
    assert result.returncode == 0, result.stderr
    run = only_run(tmp_path / "ddp")
    log = (run / "train.log").read_text()
    assert log.count("zero-shot") == 1 and log.count("epoch 3/3 ") == 1
    assert [r["trainable_backbone_units"] for r in history(run)] == [0, 1, 1]
    assert all("extra_val_f1" in r for r in history(run))

    assert train(exact_data, tmp_path / "one", 3, *flags[flags.index("--pretrain") :], *EXACT).code == 0
    one = only_run(tmp_path / "one")
    for got, want in zip(history(run), history(one)):
        for key in ("val_loss", "val_roc_auc", "extra_val_loss", "train_loss"):
            assert got[key] == pytest.approx(want[key], abs=1e-4), key
    final = checkpoint(run / "ocec_epoch_0003.pt")
    single = checkpoint(one / "ocec_epoch_0003.pt")
    assert _largest_difference(single["model_state"], final["model_state"]) < WEIGHT_TOLERANCE
    assert _largest_difference(single["ema_state"], final["ema_state"]) < WEIGHT_TOLERANCE


@pytest.fixture(scope="module")
def longer_data(tmp_path_factory) -> Path:
    """About a second per epoch on two processes, so a signal lands mid-epoch."""
    folder = tmp_path_factory.mktemp("longer")
    write_synthetic(folder, 2000, seed=4, style="a")
    return folder


def test_a_stopped_run_resumes_as_if_never_stopped(longer_data, ocec, tmp_path):
    flags = ["--data_root", longer_data, "--epochs", 3, *TINY, "--batch_size", 8, "--seed", 5]
    reference = torchrun(*flags, "--output_dir", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr

    proc = torchrun(*flags, "--output_dir", tmp_path / "stopped", background=True)
    first = tmp_path / "stopped" / "v1" / "ocec_epoch_0001.pt"
    deadline = time.time() + 240
    while not first.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
        time.sleep(0.01)
    time.sleep(0.3)  # into epoch 2
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to both processes
    out, err = proc.communicate(timeout=120)
    assert "stopped; resume with" in out, err
    run = tmp_path / "stopped" / "v1"
    interrupted = checkpoint(run / "ocec_interrupted.pt")
    assert interrupted["epoch"] == 2 and len(interrupted["rng"]) == 2  # each process's generators

    # one process cannot continue two processes' epoch: a clear error, nothing changed
    lone = ocec("train", "--resume", run, "--epochs", 3)
    assert lone.code == 2 and "2 processes were stopped mid-epoch" in lone.err

    resumed = torchrun("--resume", run, "--epochs", 3)
    assert resumed.returncode == 0, resumed.stderr
    got, want = history(run), history(only_run(tmp_path / "reference"))
    assert [r.keys() for r in got] == [r.keys() for r in want]
    for a, b in zip(got, want):  # BatchNorm statistics averaged at the stop instead of the epoch's end: ~1e-7
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_the_global_batch_must_divide_among_the_processes(data_a, tmp_path):
    result = torchrun("--data_root", data_a, "--output_dir", tmp_path, "--epochs", 1, *TINY, "--batch_size", 33)
    assert result.returncode != 0
    assert "--batch_size 33 is the global batch: it must divide among 2 processes" in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("bad", ["--output_dir", "--data_root"])
def test_a_mistake_seen_by_the_main_process_alone_stops_every_process_with_one_line(data_a, tmp_path, bad):
    # the main process checks the output folder and decodes the data first while the others wait for it
    flags = {"--data_root": data_a, "--output_dir": tmp_path / "out", bad: tmp_path / "file.txt" / "below"}
    (tmp_path / "file.txt").write_text("not a folder")
    result = torchrun(*[str(v) for pair in flags.items() for v in pair], "--epochs", 1, *TINY)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("ocec train: error:")]
    assert len(ours) == 1 and bad in ours[0], result.stderr
    assert "[rank" not in result.stderr  # no process died with a traceback (torchrun reports the exit codes)
    assert "exitcode  : 2" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "samples, batch, world, steps", [(128, 32, 1, 4), (97, 32, 1, 3), (99, 32, 1, 4), (129, 32, 2, 4), (132, 32, 2, 5)]
)
def test_steps_per_epoch_pads_then_drops_a_last_batch_of_one_image_per_process(samples, batch, world, steps):
    # 129 on 2 processes: padded to 130, a last batch of 2 = one image each, on which BatchNorm cannot train
    assert steps_per_epoch(samples, batch, world) == steps


def test_each_rank_gets_an_equal_disjoint_shard_of_every_global_batch():
    order = torch.arange(11)
    padded = pad_order(order, World(0, 4))
    assert padded.tolist() == list(range(11)) + [0]  # the first samples repeat, as DistributedSampler
    shards = [shard_of(padded[:8], World(rank, 4)) for rank in range(4)]
    assert torch.cat(shards).tolist() == list(range(8)) and {len(s) for s in shards} == {2}
