"""Optional per-epoch outputs and figures: compare plots, diagnostics PNGs, TensorBoard scalars."""

from __future__ import annotations

import pytest
from conftest import TINY, only_run

from ocec.core.plots import plot_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_draws_the_expected_lines(tmp_path):
    hist = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_f1": 0.5 + e / 10, "lr_backbone": 1e-3}
        for e in range(1, 4)
    ]
    no_val = [{k: v for k, v in r.items() if not k.startswith("val")} for r in hist]
    path, lines = plot_runs([("a", hist), ("b", no_val)], tmp_path / "p.png")
    assert lines == 4 + 2
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 600 and image.size[1] > 200


def test_diagnostics_and_tensorboard_outputs(ocec, train, data_a, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    result = train(data_a, tmp_path, 2, *TINY, "--save_diagnostics", "--tensorboard")
    assert result.code == 0, result.err
    run = only_run(tmp_path)
    pngs = sorted(p.name for p in (run / "diagnostics").iterdir())
    assert pngs == ["confusion_epoch0001.png", "confusion_epoch0002.png", "roc_epoch0001.png", "roc_epoch0002.png"]
    assert all((run / "diagnostics" / p).read_bytes()[:8] == PNG_MAGIC for p in pngs)
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and "tensorboard --logdir" in result.out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("val/f1", "train/loss", "lr/backbone", "val/fisher"):
        assert tag in tags
    assert [e.step for e in acc.Scalars("val/f1")] == [1, 2]
