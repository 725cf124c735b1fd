"""The functions a notebook calls: `ocec.train`, `ocec.evaluate`, `ocec.predict`, `ocec.export`.

Each takes the same settings as its command's flags (by name, without the dashes) and does the same work;
a mistake raises `ocec.UserError` with the message the command would print. The heavy modules are
imported inside the functions, so `import ocec` stays fast.
"""

from __future__ import annotations

from pathlib import Path


def _paths(checkpoint) -> list[str]:
    return [str(c) for c in checkpoint] if isinstance(checkpoint, (list, tuple)) else [str(checkpoint)]


def _data_options(batch_size, device, num_workers, cache_dir, max_bad_fraction) -> dict:
    from .data.decode import cache_location

    return dict(
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
        cache_dir=cache_location(cache_dir, cache_dir is False),
        max_bad_fraction=max_bad_fraction,
    )


def train(**settings) -> Path:
    """Run `ocec train` and return the run folder: `train(data_root="b", pretrain=["runs/a/v1"], epochs=20)`.
    Unset settings take their defaults, or the values of the `pretrain`/`resume` checkpoint."""
    from .training.trainer import train as run

    return run(**settings)


def evaluate(
    checkpoint,
    data_root,
    *,
    split: str = "val",
    threshold: float | str = 0.5,
    batch_size: int = 256,
    device: str = "auto",
    num_workers: int = 0,
    cache_dir=None,
    max_bad_fraction: float = 0.01,
) -> dict:
    """`ocec eval`: the report (overall, per source, threshold, ...) as a dict. `checkpoint`: a file, a
    run folder or a list of them (the highest-F1 candidate is judged); `cache_dir=False`: no cache."""
    from .tools.evaluate import evaluate_checkpoint

    options = _data_options(batch_size, device, num_workers, cache_dir, max_bad_fraction)
    return evaluate_checkpoint(_paths(checkpoint), str(data_root), split=split, threshold=threshold, **options)


def predict(
    checkpoint,
    *,
    images=None,
    data_root=None,
    threshold: float | str = 0.5,
    batch_size: int = 256,
    device: str = "auto",
    num_workers: int = 0,
    cache_dir=None,
    max_bad_fraction: float = 0.01,
) -> list[dict]:
    """`ocec predict`: one dict per image file (`images`: files or folders) or parquet row (`data_root`),
    with the columns of the command's CSV (path, row, source, prob_open, predicted, and label if known)."""
    from .core.errors import UserError
    from .tools.predict import predict_images, predict_parquet

    if (images is None) == (data_root is None):
        raise UserError("predict: give images= or data_root=, not both")
    if data_root is not None:
        options = _data_options(batch_size, device, num_workers, cache_dir, max_bad_fraction)
        table = predict_parquet(_paths(checkpoint), str(data_root), threshold=threshold, **options)
    else:
        table = predict_images(
            _paths(checkpoint), _paths(images), threshold=threshold, batch_size=batch_size, device=device
        )
    return table.to_pylist()


def export(checkpoint, output, *, format: str = "onnx", opset: int = 17, threshold: float | str = 0.5) -> dict:
    """`ocec export`: an ONNX graph (checked against PyTorch when onnxruntime is installed) or a safetensors
    file that `--pretrain` reads; returns what was written."""
    import torch

    from .finetune.pretrained import load_for_inference, resolve_threshold
    from .tools.export import export_onnx, export_safetensors

    model, snap, _ = load_for_inference(_paths(checkpoint), torch.device("cpu"))
    if format == "safetensors":
        return export_safetensors(snap, output)
    if format != "onnx":
        from .core.errors import UserError

        raise UserError(f"export: format must be 'onnx' or 'safetensors', got {format!r}")
    return export_onnx(model, output, opset=opset, threshold=resolve_threshold(threshold, snap))
