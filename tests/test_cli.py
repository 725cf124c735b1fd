"""The command line: help and defaults, the console entry point, and bad input -> one line, exit code 2."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import FIXTURES, TINY, checkpoint, run_subprocess, synth_folder

from ocec.cli import build_parser


def test_the_console_entry_point_runs_and_help_lists_defaults():
    result = run_subprocess("train", "--help")
    assert result.returncode == 0
    for flag in ("--pretrain", "--backbone_lr", "--stages", "--mix_ratio", "--plateau_patience", "--use_amp"):
        assert flag in result.stdout
    text = " ".join(result.stdout.split())
    assert re.search(r"--plateau_factor PLATEAU_FACTOR LR multiplier on a plateau \(default: 0.5\)", text)
    assert "--image_size N|HxW input size, e.g. 48 or 32x64 (default: 32x64)" in text
    assert "--backbone_lr BACKBONE_LR learning rate of the backbone (default: --lr)" in text
    assert "--use_amp mixed precision: fp16+GradScaler on CUDA, bf16 on CPU (default: off)" in text
    assert "cosface 8/0.35, arcface 8/0.2" in text


def test_train_namespace_holds_only_what_was_typed():
    args = build_parser().parse_args(["train", "--data_root", "d", "--epochs", "100", "--stages", "1:0,3:1"])
    given = {k: v for k, v in vars(args).items() if k not in ("command", "handler", "debug")}
    assert set(given) == {"data_root", "epochs", "stages"}  # a typed default (100) counts as typed
    assert [s.epoch for s in given["stages"]] == [1, 3]  # parsed once, at the edge


def test_bad_input_through_the_real_entry_point(tmp_path):
    result = run_subprocess("train", "--data_root", tmp_path / "missing")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"ocec train: error: --data_root {tmp_path / 'missing'}: no such file or directory"
    debug = run_subprocess("train", "--data_root", tmp_path / "missing", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


# --- bad input: one line naming the file, row or flag; exit code 2; nothing left behind -------------


@pytest.fixture(scope="module")
def bad(tmp_path_factory, trained_run):
    """Broken files and folders the cases below point at."""
    tmp = tmp_path_factory.mktemp("bad")
    data = synth_folder(tmp_path_factory, "bad_data", 120, seed=5, style="a")
    nosplit = tmp_path_factory.mktemp("nosplit")
    from ocec.data.synth import write_synthetic

    write_synthetic(nosplit, 120, seed=5, style="a", with_split=False)
    src = data / "dataset.parquet"
    n = pq.read_metadata(src).num_rows
    (tmp / "notes.txt").write_text("hello")
    (tmp / "empty_dir").mkdir()
    (tmp / "garbage.parquet").write_bytes(b"PAR1 nope")
    pq.write_table(pq.read_table(src).slice(0, 0), tmp / "no_rows.parquet")
    (tmp / "ckpt.txt").write_text("not a checkpoint")
    (tmp / "truncated.pt").write_bytes((trained_run / "ocec_epoch_0001.pt").read_bytes()[:2000])
    (tmp / "a_file").write_text("")
    ckpt = checkpoint(trained_run / "ocec_epoch_0003.pt")
    state = {**ckpt["model_state"], "backbone.stem.0.weight": torch.zeros(16, 3, 3, 3)}
    torch.save({**ckpt, "model_state": state}, tmp / "odd.pt")

    def table(name, **changes):
        t = pq.read_table(src)
        for column, values in changes.items():
            if values is None:
                t = t.drop_columns([column])
            else:
                index = t.schema.get_field_index(column)
                t = t.set_column(index, column, values) if index >= 0 else t.append_column(column, values)
        pq.write_table(t, tmp / name)
        return tmp / name

    labels = pq.read_table(src).column("class_id").to_pylist()
    return {
        "tmp": tmp,
        "data": data,
        "nosplit": nosplit,
        "run": trained_run,
        "nolabel": table("nolabel.parquet", label=None, class_id=None),
        "noimg": table("noimg.parquet", image_bytes=None, image_path=None),
        "badlabel": table("badlabel.parquet", class_id=None, label=pa.array(["open", "blink"] * (n // 2))),
        "splits": table("splits.parquet", split=pa.array(["holdout"] * n)),
        "valonly": table("valonly.parquet", split=pa.array(["val"] * n)),
        "junk": table("junk.parquet", image_bytes=pa.array([b"junk"] * n, pa.binary())),
        "paths": table("paths.parquet", image_bytes=None, image_path=pa.array([f"missing/{i}.png" for i in range(n)])),
        "oneclass": table("oneclass.parquet", split=pa.array(["train" if c else "val" for c in labels])),
    }


def _train(b, *args):
    return ["train", "--output_dir", b["tmp"] / "out", *TINY, "--epochs", 1, *args]


BAD_INPUTS = [
    ("data_root missing", lambda b: _train(b, "--data_root", b["tmp"] / "nope"), "no such file or directory"),
    ("not parquet", lambda b: _train(b, "--data_root", b["tmp"] / "notes.txt"), "not a .parquet file"),
    ("unreadable parquet", lambda b: _train(b, "--data_root", b["tmp"] / "garbage.parquet"), "not a readable parquet"),
    ("folder without parquet", lambda b: _train(b, "--data_root", b["tmp"] / "empty_dir"), "holds no .parquet files"),
    ("empty parquet", lambda b: _train(b, "--data_root", b["tmp"] / "no_rows.parquet"), "has no rows"),
    (
        "no label column",
        lambda b: _train(b, "--data_root", b["nolabel"]),
        "needs a 'label' or 'class_id' column to train",
    ),
    ("no image column", lambda b: _train(b, "--data_root", b["noimg"]), "needs an 'image_bytes' or 'image_path'"),
    ("bad label", lambda b: _train(b, "--data_root", b["badlabel"]), "row 1: label 'blink' is not one of"),
    ("unknown splits only", lambda b: _train(b, "--data_root", b["splits"]), "no row has a split of train/val/test"),
    ("empty train split", lambda b: _train(b, "--data_root", b["valonly"]), "the train split is empty"),
    ("single-class train split", lambda b: _train(b, "--data_root", b["oneclass"]), "every train row is 'open'"),
    ("undecodable images", lambda b: _train(b, "--data_root", b["junk"]), "images unreadable"),
    ("missing image files", lambda b: _train(b, "--data_root", b["paths"]), "images unreadable"),
    ("invalid image size", lambda b: _train(b, "--data_root", b["data"], "--image_size", "32by64"), "--image_size"),
    ("zero batch size", lambda b: _train(b, "--data_root", b["data"], "--batch_size", 0), "--batch_size must be"),
    ("batch of one", lambda b: _train(b, "--data_root", b["data"], "--batch_size", 1), "BatchNorm needs two images"),
    (
        "zero batch size for eval",
        lambda b: ["eval", "--checkpoint", b["tmp"], "--data_root", b["data"], "--batch_size", 0],
        "--batch_size: must be a positive integer",
    ),
    ("negative epochs", lambda b: _train(b, "--data_root", b["data"], "--epochs", -1), "--epochs must be a positive"),
    ("negative seed", lambda b: _train(b, "--data_root", b["nosplit"], "--seed", -1), "--seed must be >= 0"),
    (
        "ratios over 1",
        lambda b: _train(b, "--data_root", b["data"], "--train_ratio", 0.8, "--val_ratio", 0.3),
        "must be <= 1",
    ),
    (
        "unwritable output",
        lambda b: ["train", "--data_root", b["data"], *TINY, "--output_dir", b["tmp"] / "a_file" / "sub"],
        "cannot write there",
    ),
    ("pretrain missing", lambda b: _train(b, "--data_root", b["data"], "--pretrain", b["tmp"] / "none.pt"), "no such"),
    (
        "pretrain not a checkpoint",
        lambda b: _train(b, "--data_root", b["data"], "--pretrain", b["tmp"] / "ckpt.txt"),
        "not a PyTorch checkpoint",
    ),
    (
        "pretrain truncated",
        lambda b: _train(b, "--data_root", b["data"], "--pretrain", b["tmp"] / "truncated.pt"),
        "truncated or damaged",
    ),
    (
        "pretrain incompatible",
        lambda b: _train(b, "--data_root", b["data"], "--pretrain", b["run"], "--num_blocks", 3),
        "num_blocks: checkpoint=2, given=3",
    ),
    ("resume missing", lambda b: ["train", "--resume", b["tmp"] / "none.pt"], "no such file"),
    ("resume truncated", lambda b: ["train", "--resume", b["tmp"] / "truncated.pt"], "truncated or damaged"),
    (
        "resume foreign",
        lambda b: ["train", "--resume", FIXTURES / "upstream_baseline.pt"],
        "not an ocec training checkpoint",
    ),
    ("pretrain and resume", lambda b: _train(b, "--pretrain", b["run"], "--resume", b["run"]), "exclude each other"),
    ("no data_root", lambda b: _train(b), "--data_root is required"),
    ("bad device", lambda b: _train(b, "--data_root", b["data"], "--device", "tpu"), "--device"),
    ("bad stages", lambda b: _train(b, "--data_root", b["data"], "--stages", "3:0.5,2:1"), "epochs must increase"),
    (
        "stage2_lr alone",
        lambda b: _train(b, "--data_root", b["data"], "--stage2_lr", 1e-4),
        "--stage2_lr applies from --unfreeze_backbone_epoch on, which is not set",
    ),
    (
        "unfreeze_ratio alone",
        lambda b: _train(b, "--data_root", b["data"], "--unfreeze_ratio", 0.5),
        "--unfreeze_ratio applies from --unfreeze_backbone_epoch on",
    ),
    (
        "margin_s with margin none",
        lambda b: _train(b, "--data_root", b["data"], "--margin_method", "none", "--margin_s", 16),
        "--margin_s applies to cosface/arcface heads",
    ),
    (
        "reinit_head without pretrain",
        lambda b: _train(b, "--data_root", b["data"], "--reinit_head"),
        "--reinit_head applies to --pretrain weights",
    ),
    (
        "ema decay of 1",
        lambda b: _train(b, "--data_root", b["data"], "--ema_decay", 1),
        "--ema_decay must be in (0, 1)",
    ),
    (
        "layer decay 0",
        lambda b: _train(b, "--data_root", b["data"], "--layer_decay", 0),
        "--layer_decay must be in (0, 1]",
    ),
    (
        "hard mining 1",
        lambda b: _train(b, "--data_root", b["data"], "--hard_mining", 1),
        "--hard_mining must be in [0, 1)",
    ),
    (
        "negative l2sp",
        lambda b: _train(b, "--data_root", b["data"], "--pretrain", b["run"], "--l2sp", -1),
        "--l2sp must be >= 0",
    ),
    (
        "negative precise_bn",
        lambda b: _train(b, "--data_root", b["data"], "--precise_bn", -5),
        "--precise_bn must be >= 0",
    ),
    ("unknown recipe", lambda b: _train(b, "--data_root", b["data"], "--recipe", "magic"), "invalid choice: 'magic'"),
    ("unknown side", lambda b: _train(b, "--data_root", b["data"], "--unfreeze_from", "middle"), "invalid choice"),
    (
        "bn_adapt without pretrain",
        lambda b: _train(b, "--data_root", b["data"], "--bn_adapt"),
        "--bn_adapt applies to --pretrain",
    ),
    (
        "recipe without pretrain",
        lambda b: _train(b, "--data_root", b["data"], "--recipe", "lp-ft"),
        "--recipe applies to --pretrain",
    ),
    (
        "threshold not a number",
        lambda b: ["eval", "--checkpoint", b["run"], "--data_root", b["data"], "--threshold", "high"],
        "expected auto or a probability",
    ),
    (
        "threshold auto without one stored",
        lambda b: [
            "eval",
            "--checkpoint",
            FIXTURES / "upstream_baseline.pt",
            "--data_root",
            b["data"],
            "--threshold",
            "auto",
        ],
        "records no threshold",
    ),
    (
        "pseudo-label threshold over 1",
        lambda b: [
            "pseudo-label",
            "--checkpoint",
            b["run"],
            "--data_root",
            b["data"],
            "--out",
            b["tmp"] / "out",
            "--threshold",
            2,
        ],
        "a probability is in [0, 1]",
    ),
    (
        "eval of mismatched weights",
        lambda b: ["eval", "--checkpoint", b["tmp"] / "odd.pt", "--data_root", b["data"]],
        "do not match the recorded architecture",
    ),
    (
        "eval bad max_bad_fraction",
        lambda b: ["eval", "--checkpoint", b["run"], "--data_root", b["data"], "--max_bad_fraction", 3],
        "--max_bad_fraction must be in [0, 1]",
    ),
]


@pytest.mark.parametrize("build,expected", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gives_one_line_and_exit_code_2(ocec, bad, build, expected):
    result = ocec(*build(bad))
    lines = result.err.strip().splitlines()
    assert result.code == 2, (result.code, result.err)
    assert len(lines) == 1, result.err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.err + result.out
    assert not (bad["tmp"] / "out").exists()  # a failed run leaves no new output folder behind


def test_no_flag_is_taken_from_a_prefix_and_a_typo_gets_the_closest_flag(ocec):
    """argparse's prefix matching is off for every command: `--epoch 2` is not `--epochs 2`."""
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in commands.items():
        flags = {s for a in sub._actions for s in a.option_strings if s.startswith("--")}
        longest = max(flags - {"--help", "--debug"}, key=len)
        prefix = longest[:-1]
        assert prefix not in flags
        required = [a for a in sub._actions if a.required]
        required += [g._group_actions[0] for g in sub._mutually_exclusive_groups if g.required]
        needed = [w for a in required for w in (a.option_strings[:1] or []) + ["x"]]
        _, extra = parser.parse_known_args([name, *needed, prefix, "1"])
        assert extra[:1] == [prefix], name
    result = ocec("train", "--data_root", "d", "--epoch", 2)
    assert result.code == 2
    assert result.err.strip() == "ocec train: error: unrecognized argument --epoch; did you mean --epochs?"
    result = ocec("eval", "--checkpoint", "c", "--data_root", "d", "--json_out", "x")
    assert result.code == 2 and "did you mean --json?" in result.err
