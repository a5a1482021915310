"""Inference backends of the runner: torch (CPU, or CUDA under fp16 autocast) and ONNX Runtime.

The ONNX graph is exported once from the safetensors into a cache keyed by the weights' sha256 and the
export recipe, so a retrained model can never run a stale graph; the runner checks every export
against torch (`max_abs_diff` on `check_input`) before it uses it. `OwnerThread` keeps a model's CUDA
work on one thread. Backends return probabilities (sigmoid applied).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from workers import models

log = logging.getLogger(__name__)

#: Max |ONNX - torch| of the output probabilities accepted when an export is checked.
ONNX_TOLERANCE = 1e-3
#: Max |CUDA fp16 autocast - CPU fp32| of the output probabilities (tests/unit/test_runner_cuda.py).
#: fp16 keeps ~3 significant digits: on the shipped models the logits (|x| up to ~16) move by up to
#: ~0.03, and as sigmoid's slope is at most 1/4 the probabilities by up to ~0.006 (measured with the
#: whole network in fp16 on CPU, which is coarser than autocast). 0.02 leaves a 3x margin; thresholded
#: masks then differ only in pixels whose probability is within 0.02 of the threshold.
CUDA_FP16_TOLERANCE = 0.02
#: Bumped when the export recipe changes, so old cached graphs are not reused.
EXPORT_RECIPE = "v1"
OPSET = 17


@dataclass
class Prediction:
    """Probabilities for a batch: mask (N, C, S, S) and presence (N,) when the model has an aux head."""

    mask: np.ndarray
    presence: np.ndarray | None = None


class Backend(Protocol):
    name: str

    def __call__(self, x: np.ndarray) -> Prediction: ...


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x.astype(np.float32))), dtype=np.float32)


class TorchBackend:
    """torch eager; on CUDA under fp16 autocast (weights stay fp32, matmuls/convs run fp16)."""

    def __init__(self, module: Any, device: str) -> None:
        import torch

        self.name = f"torch-{device}"
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()

    def __call__(self, x: np.ndarray) -> Prediction:
        import torch

        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.float16, enabled=self.device.type == "cuda"),
        ):
            out = self.module(torch.from_numpy(x).to(self.device))
        mask, presence = out if isinstance(out, tuple) else (out, None)
        return Prediction(
            mask=torch.sigmoid(mask.float()).cpu().numpy(),
            presence=None if presence is None else torch.sigmoid(presence.float()).reshape(-1).cpu().numpy(),
        )


class OwnerThread:
    """Runs every call it is given on one thread of its own, for whichever thread asks.

    All passes of the CUDA runner go through one. PyTorch keeps cuDNN's benchmarked kernel choices
    (`cudnn.benchmark`) per thread (pytorch/pytorch#191744), so passes made straight from a pool of
    task threads search again for each input shape in every thread; on an H200, 8 concurrent callers
    got 1.2 images/s where one caller got 15.6, and warming every shape at load (in one thread) did not
    help (measured before this class; not yet measured with it). One owner thread searches once.
    """

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def run(self, fn: Callable[[np.ndarray], Prediction], x: np.ndarray) -> Prediction:
        return self._pool.submit(fn, x).result()  # re-raises the call's exception here


class OnThread:
    """A backend whose calls run on `owner`'s thread."""

    def __init__(self, backend: Backend, owner: OwnerThread) -> None:
        self.backend = backend
        self.owner = owner
        self.name = backend.name

    def __call__(self, x: np.ndarray) -> Prediction:
        return self.owner.run(self.backend, x)


class OnnxBackend:
    def __init__(self, path: Path, threads: int | None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.name = "onnx-cpu"
        self.path = path
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, x: np.ndarray) -> Prediction:
        out = self.session.run(None, {"image": np.ascontiguousarray(x, dtype=np.float32)})
        mask = _sigmoid(out[0])
        presence = _sigmoid(out[1]).reshape(-1) if len(out) > 1 else None
        return Prediction(mask=mask, presence=presence)


def onnx_path(cache_dir: Path, sha256: str, spec: models.ModelSpec) -> Path:
    """Cache file of an export: keyed by the weights' sha256 AND what shapes the graph (the spec,
    e.g. input size, and the export recipe), so no stale or differently shaped graph is ever reused."""
    shape_key = json.dumps([asdict(spec), EXPORT_RECIPE, OPSET], sort_keys=True)
    return cache_dir / f"{sha256}.{hashlib.sha256(shape_key.encode()).hexdigest()[:12]}.onnx"


def export_onnx(module: Any, spec: models.ModelSpec, target: Path) -> None:
    """Export `module` to `target` atomically (several worker processes may race to the same file)."""
    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    outputs = ["mask", "presence"] if spec.aux_classification else ["mask"]
    dummy = torch.zeros(1, spec.in_channels, spec.input_size, spec.input_size)
    fd, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".onnx.tmp", dir=target.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter is chatty about tracing
            # dynamo=False: the TorchScript-based exporter needs no onnxscript and handles smp models.
            torch.onnx.export(
                module,
                (dummy,),
                tmp,
                dynamo=False,
                input_names=["image"],
                output_names=outputs,
                dynamic_axes={n: {0: "batch"} for n in ["image", *outputs]},
                opset_version=OPSET,
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def max_abs_diff(a: Prediction, b: Prediction) -> float:
    diff = float(np.abs(a.mask - b.mask).max())
    if a.presence is not None and b.presence is not None:
        diff = max(diff, float(np.abs(a.presence - b.presence).max()))
    return diff


def check_input(spec: models.ModelSpec, batch: int = 2) -> np.ndarray:
    """A fixed, image-like probe input (a smooth gradient plus seeded noise) for equality checks."""
    rng = np.random.default_rng(0)
    s = spec.input_size
    ramp = np.linspace(-2, 2, s, dtype=np.float32)
    base = ramp[None, :] + ramp[:, None] * 0.5
    noise = rng.normal(0, 0.5, size=(batch, spec.in_channels, s, s)).astype(np.float32)
    return base[None, None] + noise
