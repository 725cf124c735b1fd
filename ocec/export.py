"""Shipping a model: ONNX (optional extra `ocec[onnx]`) and safetensors (`ocec[safetensors]`).

The ONNX graph takes `images` float32 [N, 3, H, W] RGB in [0, 1] (dynamic N) and returns
`prob_open` [N]; normalisation is inside the graph and every Conv+BatchNorm pair is folded.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .checkpoint import Snapshot
from .errors import UserError
from .fileio import atomic_write, to_jsonable
from .model import OcecModel

log = logging.getLogger("ocec")


class ProbabilityOpen(nn.Module):
    """What deployers run: images in [0, 1] -> probability that the eye is open."""

    def __init__(self, model: OcecModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(images))


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of `model` (eval mode) with each Conv2d directly followed by a BatchNorm2d inside a
    Sequential fused into one Conv2d; returns the copy and how many pairs were folded."""
    model = copy.deepcopy(model).eval()
    folded = 0
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                module._modules[first] = fuse_conv_bn_eval(conv, bn)
                module._modules[second] = nn.Identity()
                folded += 1
    return model, folded


def export_onnx(model: OcecModel, output: str | Path, opset: int = 17, check: bool = True) -> dict:
    """Write the ONNX file atomically; with onnxruntime installed, compare it with PyTorch."""
    try:
        import onnx  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise UserError("ONNX export needs the onnx package: pip install 'ocec[onnx]'") from None
    model = model.cpu().eval()
    folded, pairs = fold_batchnorm(model)
    wrapper = ProbabilityOpen(folded).eval()
    h, w = model.config.image_size
    dummy = torch.rand(2, 3, h, w)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (dummy,),
            buffer,
            dynamo=False,
            input_names=["images"],
            output_names=["prob_open"],
            dynamic_axes={"images": {0: "N"}, "prob_open": {0: "N"}},
            opset_version=opset,
        )
    path = atomic_write(output, lambda f: f.write(buffer.getvalue()))
    report = {"output": str(path), "opset": opset, "folded_batchnorm": pairs, "max_abs_diff": None}
    if check:
        try:
            import onnxruntime as ort
        except ImportError:
            log.warning("onnxruntime is not installed: exported without a numerical check (pip install 'ocec[onnx]')")
            return report
        batch = torch.rand(5, 3, h, w, generator=torch.Generator().manual_seed(0))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        onnx_out = torch.from_numpy(session.run(["prob_open"], {"images": batch.numpy()})[0])
        with torch.no_grad():
            reference = ProbabilityOpen(model)(batch)
        report["max_abs_diff"] = float((onnx_out - reference).abs().max())
    return report


def export_safetensors(snap: Snapshot, output: str | Path) -> dict:
    """Weights + the model config (in the file's metadata) that `--pretrain` reads back."""
    try:
        from safetensors.torch import save
    except ImportError:
        raise UserError("--format safetensors needs the safetensors package: pip install 'ocec[safetensors]'") from None
    state = {k: v.contiguous() for k, v in snap.state.items()}
    metadata = {
        "ocec_format": "1",
        "ocec_model_config": json.dumps(snap.model_config.to_dict()),
        "ocec_metrics": json.dumps(to_jsonable({"f1": snap.score})),
    }
    data = save(state, metadata=metadata)
    path = atomic_write(output, lambda f: f.write(data))
    return {"output": str(path), "tensors": len(state)}
