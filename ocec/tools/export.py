"""Shipping a model: ONNX (optional extra `ocec[onnx]`) and safetensors (`ocec[safetensors]`).

The ONNX graph takes `images` float32 [N, 3, H, W] RGB in [0, 1] (dynamic N) and returns
`prob_open` [N] and the margin-free `logit` [N]; normalisation is inside the graph and every
Conv+BatchNorm pair is folded. The self-check compares logits, not probabilities (a confident
model's probabilities saturate at 1.0 and would hide a broken graph), on rendered eye crops.
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

from ..core.errors import UserError
from ..core.fileio import atomic_write, to_jsonable
from ..engine.checkpoint import FORMAT_VERSION
from ..finetune.pretrained import Snapshot
from ..models.model import OcecModel

log = logging.getLogger("ocec")


CHECK_TOLERANCE = 1e-4  # |onnx - torch| <= tol + tol * |torch| on logits (fp32 graphs agree to ~1e-6)


class Deployed(nn.Module):
    """What deployers run: images in [0, 1] -> (probability that the eye is open, its logit, the decision)."""

    def __init__(self, model: OcecModel, threshold: float = 0.5):
        super().__init__()
        self.model, self.threshold = model, threshold

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logit = self.model(images)
        prob = torch.sigmoid(logit)
        return prob, logit, prob >= self.threshold


def check_images(image_size: tuple[int, int], count: int = 16) -> torch.Tensor:
    """Eye crops as the model sees them (rendered by ocec.data.synth, PNG round trip, the training resize):
    open and closed, both styles. Realistic inputs keep logits in the range where errors show."""
    import numpy as np

    from ..data.decode import decode_image_bytes
    from ..data.synth import encode, make_subjects, render_eye

    rng = np.random.default_rng(0)
    subjects = make_subjects(4, rng)
    images = [
        decode_image_bytes(encode(render_eye(rng, i % 2 == 0, subjects[i % 4], "ab"[(i // 2) % 2])), "", "", image_size)
        for i in range(count)
    ]
    return torch.from_numpy(np.stack(images)).float() / 255.0


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


def export_onnx(
    model: OcecModel, output: str | Path, *, opset: int = 17, threshold: float = 0.5, check: bool = True
) -> dict:
    """Write the ONNX file atomically (the threshold is also in its metadata as ocec_threshold); with
    onnxruntime installed, compare its logits with PyTorch's."""
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the onnx package: pip install 'ocec[onnx]'") from None
    model = model.cpu().eval()
    folded, pairs = fold_batchnorm(model)
    if hasattr(folded.margin_head, "inference_form"):  # a cosine margin head: one constant direction
        folded.margin_head = folded.margin_head.inference_form()
    wrapper = Deployed(folded, threshold).eval()
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
            output_names=["prob_open", "logit", "is_open"],
            dynamic_axes={"images": {0: "N"}, "prob_open": {0: "N"}, "logit": {0: "N"}, "is_open": {0: "N"}},
            opset_version=opset,
        )
    graph = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(graph, {"ocec_threshold": f"{threshold:.6g}", "ocec_labels": "0 closed, 1 open"})
    path = atomic_write(output, lambda f: f.write(graph.SerializeToString()))
    report = {
        "output": str(path),
        "opset": opset,
        "folded_batchnorm": pairs,
        "max_abs_diff": None,
        "threshold": threshold,
        "image_size": [h, w],
    }
    if check:
        try:
            import onnxruntime as ort
        except ImportError:
            log.warning("onnxruntime is not installed: exported without a numerical check (pip install 'ocec[onnx]')")
            return report
        batch = check_images((h, w))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        onnx_logit = torch.from_numpy(session.run(["logit"], {"images": batch.numpy()})[0])
        with torch.no_grad():
            reference = model(batch)
        diff = (onnx_logit - reference).abs()
        report.update(
            max_abs_diff=float(diff.max()),
            tolerance=CHECK_TOLERANCE,
            check_images=len(batch),
            passed=bool((diff <= CHECK_TOLERANCE * (1 + reference.abs())).all()),
        )
        report.update(opencv_check(path, batch, torch.sigmoid(reference)))
    return report


def opencv_check(path: Path, batch: torch.Tensor, reference_prob: torch.Tensor) -> dict:
    """Deployers also run the file in OpenCV's DNN module: with opencv-python(-headless) installed, read it
    there and compare `prob_open` with PyTorch's. {} without OpenCV."""
    try:
        import cv2
    except ImportError:
        return {}
    try:
        net = cv2.dnn.readNetFromONNX(str(path))
        net.setInput(batch.numpy(), "images")
        prob = torch.from_numpy(net.forward("prob_open").reshape(-1).copy())
    except cv2.error as exc:
        message = str(exc).strip().splitlines()[-1][:200]
        log.warning("OpenCV %s cannot run the exported graph: %s", cv2.__version__, message)
        return {"opencv": cv2.__version__, "opencv_passed": False, "opencv_error": message}
    diff = float((prob - reference_prob).abs().max())
    return {"opencv": cv2.__version__, "opencv_max_abs_diff": diff, "opencv_passed": diff <= CHECK_TOLERANCE}


def export_safetensors(snap: Snapshot, output: str | Path) -> dict:
    """Weights + the model config (in the file's metadata) that `--pretrain` reads back."""
    try:
        from safetensors.torch import save
    except ImportError:
        raise UserError("--format safetensors needs the safetensors package: pip install 'ocec[safetensors]'") from None
    state = {k: v.contiguous() for k, v in snap.state.items()}
    metadata = {
        "ocec_format": str(FORMAT_VERSION),
        "ocec_model_config": json.dumps(snap.model_config.to_dict()),
        "ocec_metrics": json.dumps(to_jsonable({"f1": snap.score})),
    }
    data = save(state, metadata=metadata)
    path = atomic_write(output, lambda f: f.write(data))
    return {"output": str(path), "tensors": len(state)}
