"""The README and guides show commands that exist; the fine-tune script and the demo run end to end."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import only_run

from ocec.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "finetune.md", ROOT / "docs" / "finetune.zh.md"]
SCRIPT = ROOT / "scripts" / "train_finetune.sh"


def _commands(doc: Path | str) -> list[str]:
    """Lines of the ```bash blocks (of a file, or of a piece of one), continuation lines joined."""
    commands, block = [], None
    for line in (doc.read_text() if isinstance(doc, Path) else doc).splitlines():
        if line.startswith("```"):
            if block is not None:
                commands.extend(c.strip() for c in "\n".join(block).replace("\\\n", " ").splitlines() if c.strip())
                block = None
            elif line.strip() == "```bash":
                block = []
        elif block is not None:
            block.append(line)
    return commands


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_ocec_command_in_the_docs_parses(doc):
    parser = build_parser()
    found = 0
    for command in _commands(doc):
        for part in command.split("&&"):
            tokens = shlex.split(part)
            if tokens[:1] in (["python"], ["torchrun"]) and "ocec" in tokens:  # torchrun ... -m ocec train ...
                start = tokens.index("ocec")
                assert tokens[start - 1] == "-m", part
                found += 1
                try:
                    parser.parse_args(tokens[start + 1 :])
                except SystemExit:
                    pytest.fail(f"{doc.name}: {part.strip()!r} does not parse")
    assert found >= 3, f"{doc.name}: expected ocec commands"


def _extras_needed(tokens: list[str]) -> set[str]:
    """The optional extras an ocec command line uses (the same checks the commands make)."""
    command, needed = tokens[0], set()
    if command == "compare" and "--plot" in tokens or "--save_diagnostics" in tokens:
        needed.add("plot")
    if command in ("export", "exportonnx"):
        needed.add("safetensors" if "safetensors" in tokens else "onnx")
    if command == "sweep":
        needed.add("sweep")
    if "--tensorboard" in tokens:
        needed.add("tensorboard")
    return needed


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_that_needs_an_extra_has_it_installed_or_stated_in_its_section(doc):
    """A reader who runs a section's commands after the README's install meets no missing-extra error the
    section did not mention (`pip install -e '.[plot,onnx]'` in the block, or the extra named in the text)."""
    for section in re.split(r"\n## ", doc.read_text()):
        stated = {e.strip() for group in re.findall(r"(?:\.|ocec)\[([a-z,]+)\]", section) for e in group.split(",")}
        for command in _commands(section):
            tokens = shlex.split(command.split("&&")[-1])
            if "ocec" in tokens and tokens[tokens.index("ocec") - 1] == "-m":
                missing = _extras_needed(tokens[tokens.index("ocec") + 1 :]) - stated
                assert not missing, f"{doc.name}: {command!r} needs the extra(s) {missing}, not stated in its section"


def test_the_readme_verify_block_runs_as_written(tmp_path, trained_run, data_b):
    """The block runs top to bottom, on tiny data and one epoch instead of /data/eyes_b and 150."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Verify the fine-tune") :].split("\n## ")[0]
    lines = _commands(section)
    assert lines[0] == "pip install -e '.[plot,onnx]'"
    import importlib.util

    assert all(importlib.util.find_spec(m) for m in ("matplotlib", "onnx", "onnxruntime"))  # what it installs
    script = "\n".join(["set -euo pipefail", *lines[1:]])
    script = script.replace("/data/eyes_b", str(data_b)).replace("runs/ocec_hq/v8", str(trained_run))
    script = script.replace("--epochs 150", "--epochs 1 --num_workers 0").replace("python ", f"{sys.executable} ")
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "compare.png").stat().st_size > 0 and json.loads((tmp_path / "eval_b.json").read_text())
    assert "onnxruntime vs PyTorch" in result.stdout and (tmp_path / "ocec_b.onnx").exists()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_script_variables_in_the_docs_exist(doc):
    script = SCRIPT.read_text()
    for command in _commands(doc):
        if "train_finetune.sh" in command:
            for name in re.findall(r"\b([A-Z][A-Z0-9_]+)=", command):
                assert f'{name}="${{{name}:-' in script, f"{doc.name}: {name} is not a setting of the script"


def _script(env: dict, *args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHON": sys.executable, **{k: str(v) for k, v in env.items()}},
    )


def test_script_glob_resolves_to_the_best_f1_not_the_newest(tmp_path, data_b):
    folder = tmp_path / "v8"
    folder.mkdir()
    for i, name in enumerate(
        [
            "ocec_best_epoch0041_f1_0.9851.pt",
            "ocec_best_epoch0007_f1_0.9900.pt",
            "ocec_best_epoch0099_f1_0.9860.pt",
            "ocec_epoch_0100.pt",
        ]
    ):
        (folder / name).write_bytes(b"x")
        os.utime(folder / name, (1_000_000 + i, 1_000_000 + i))  # the last ones are the newest
    result = _script({"PRETRAIN_MODEL": f"{folder}/ocec_best_epoch*.pt", "DATA_ROOT_B": data_b, "DRY_RUN": 1})
    assert result.returncode == 0, result.stderr
    assert f"checkpoint      : {folder}/ocec_best_epoch0007_f1_0.9900.pt" in result.stdout
    assert f"--pretrain {folder}/ocec_best_epoch0007_f1_0.9900.pt --data_root {data_b}" in result.stdout


def test_script_reports_a_missing_checkpoint(tmp_path, data_b):
    result = _script({"PRETRAIN_MODEL": f"{tmp_path}/nothing_*.pt", "DATA_ROOT_B": data_b})
    assert result.returncode == 2 and "no such file, folder or matching checkpoint" in result.stderr


def test_script_banner_shows_the_values_that_will_run(tmp_path, trained_run, data_b):
    """Extra flags win over the script's variables (ocec keeps the last value): the banner says so too."""
    env = {"PRETRAIN_MODEL": trained_run, "DATA_ROOT_B": data_b, "DRY_RUN": 1}
    result = _script(env, "--epochs", 2, "--lr=5e-4", "--no_bn_adapt", "--stages", "1:0:1e-3")
    assert result.returncode == 0, result.stderr
    assert "epochs          : 2 (warmup" in result.stdout and "lr 5e-4," in result.stdout
    assert "BatchNorm adaptation off" in result.stdout and "stages          : 1:0:1e-3" in result.stdout


def test_a_dry_run_checks_what_the_run_checks(tmp_path, data_b):
    """A PRETRAIN_MODEL glob that matches nothing, or a missing DATA_ROOT_B, fail the dry run as they would the run."""
    result = _script({"PRETRAIN_MODEL": f"{tmp_path}/nothing_*.pt", "DATA_ROOT_B": data_b, "DRY_RUN": 1})
    assert result.returncode == 2 and "no such file, folder or matching checkpoint" in result.stderr
    assert "command" not in result.stdout
    result = _script({"PRETRAIN_MODEL": tmp_path, "DATA_ROOT_B": tmp_path / "missing", "DRY_RUN": 1})
    assert result.returncode == 2 and "DATA_ROOT_B=" in result.stderr
    demo = _script({"DRY_RUN": 1, "DEMO_DIR": tmp_path / "demo"})  # the demo's model A is trained by the run itself
    assert demo.returncode == 0 and "ocec_best_epoch*.pt" in demo.stdout


def _tiny_finetune(trained_run, data_b, out, **settings) -> dict:
    """Script settings for a one-epoch CPU fine-tune of the tiny trained run."""
    base = {"PRETRAIN_MODEL": trained_run, "DATA_ROOT_B": data_b, "OUTPUT_DIR": out, "EPOCHS": 1, "BATCH_SIZE": 32}
    return {**base, "NUM_WORKERS": 0, "DEVICE": "cpu", **settings}


def test_script_runs_a_fine_tune_with_overrides_and_extra_flags(tmp_path, trained_run, data_b):
    env = _tiny_finetune(trained_run, data_b, tmp_path / "out", LR="3e-4", BACKBONE_LR="1e-4")
    result = _script(env, "--keep_last", 1, "--augment", "light")
    assert result.returncode == 0, result.stderr
    assert (
        "== fine-tune configuration" in result.stdout
        and "extra flags     : --keep_last 1 --augment light" in result.stdout
    )
    config = json.loads((only_run(tmp_path / "out") / "config.json").read_text())["train"]
    assert (config["lr"], config["backbone_lr"], config["keep_last"], config["augment"]) == (3e-4, 1e-4, 1, "light")
    assert config["pretrain"] == [str(trained_run)]


def test_script_runs_nproc_processes_under_torchrun(tmp_path, trained_run, data_b):
    env = _tiny_finetune(trained_run, data_b, tmp_path / "out", NPROC=2, OMP_NUM_THREADS=1)
    result = _script(env)
    assert result.returncode == 0, result.stderr
    assert "-m torch.distributed.run --standalone --nproc_per_node=2 -m ocec train" in result.stdout
    assert (
        "torchrun: 2 processes on cpu, global batch 32 (16 each)"
        in (only_run(tmp_path / "out") / "train.log").read_text()
    )
    assert _script({**env, "NPROC": "two"}).returncode == 2


def test_script_background_mode_writes_a_timestamped_log(tmp_path, trained_run, data_b):
    result = _script(_tiny_finetune(trained_run, data_b, tmp_path / "out", BACKGROUND=1))
    assert result.returncode == 0, result.stderr
    log = Path(re.search(r"log: (\S+)", result.stdout).group(1))
    assert re.fullmatch(r"finetune_\d{8}_\d{6}\.log", log.name) and log.parent == tmp_path / "out" / "logs"
    deadline = time.time() + 180
    while "done: best F1" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline, log.read_text() if log.exists() else "no log"
        time.sleep(0.2)
    time.sleep(0.5)
    assert torch.load(only_run(tmp_path / "out").joinpath("ocec_epoch_0001.pt"), weights_only=True)["epoch"] == 1


def test_demo_runs_end_to_end_and_prints_the_table(ocec, tmp_path):
    result = ocec(
        "demo", "--out", tmp_path, "--rows_a", 240, "--rows_b", 160, "--epochs_a", 1, "--epochs_b", 1, "--device", "cpu"
    )
    assert result.code == 0, result.err
    for row in ("model A (on A)", "B from scratch", "B fine-tuned from A"):
        assert re.search(rf"{re.escape(row)}\s+(\d\.\d{{4}}|n/a)\s", result.out), row
    assert "python -m ocec compare" in result.out
    for folder in ("model_a", "scratch_b", "finetune_b"):
        assert (only_run(tmp_path / folder) / "summary.json").is_file()
    summary = json.loads((only_run(tmp_path / "finetune_b") / "summary.json").read_text())
    assert summary["pretrain"]["path"].startswith(str(tmp_path / "model_a"))
