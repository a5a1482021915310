"""ModelRunner: every shipped model loaded once per worker process, run on the best backend here.

- CUDA present: torch with fp16 autocast, images micro-batched (`gpu_batch_size`), every pass on one
  thread that owns the GPU work (`OwnerThread`).
- CPU: the same weights through ONNX Runtime (about 2.5x faster than torch eager on these machines,
  see DESIGN.md). The ONNX graph is exported once from the safetensors into a cache keyed by the
  weights' sha256, so a retrained model can never run a stale graph, and each export is checked
  against torch before it is used. If export or ONNX Runtime fails the model runs in torch eager
  (logged), so the worker degrades in speed, not in function.

The runner returns probabilities (sigmoid already applied); thresholds and clinical logic live in
`workers.inference`. The backends and the ONNX export are in `workers.backends`, GPU micro-batching in
`workers.batching`; this module picks and loads them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from workers import models, tta
from workers.api import MODEL_NAMES, ModelInfo
from workers.backends import (
    ONNX_TOLERANCE,
    Backend,
    OnnxBackend,
    OnThread,
    OwnerThread,
    Prediction,
    TorchBackend,
    check_input,
    export_onnx,
    max_abs_diff,
    onnx_path,
)
from workers.batching import MicroBatcher
from workers.catalogue import weights_dir

log = logging.getLogger(__name__)

ENV_CACHE_DIR = "CXRNODE_CACHE"  # ONNX exports go to $CXRNODE_CACHE/onnx
ENV_DEVICE = "CXRNODE_WORKER_DEVICE"  # auto | cpu | cuda
ENV_BACKEND = "CXRNODE_WORKER_BACKEND"  # auto | onnx | torch (CPU only; CUDA always runs torch)
ENV_THREADS = "CXRNODE_WORKER_THREADS"  # intra-op threads on CPU
ENV_MODELS = "CXRNODE_WORKER_MODELS"  # comma list of models to load; default all


def default_weights_dir() -> Path:
    return weights_dir()


def default_cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env) / "onnx"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "cxr-node" / "onnx"


def models_from_env() -> tuple[str, ...]:
    raw = os.environ.get(ENV_MODELS, "")
    names = tuple(n.strip() for n in raw.split(",") if n.strip()) or MODEL_NAMES
    unknown = set(names) - set(MODEL_NAMES)
    if unknown:
        raise ValueError(f"{ENV_MODELS}: unknown models {sorted(unknown)}; known: {MODEL_NAMES}")
    return names


@dataclass
class LoadedModel:
    name: str
    spec: models.ModelSpec
    card: dict[str, Any]
    info: ModelInfo
    backend: Backend
    transforms: list[tta.Transform] = field(default_factory=list)  # the card's test-time augmentation
    batcher: MicroBatcher | None = None
    calls: int = 0
    images: int = 0
    # Recent forward-pass times only: a worker runs for weeks.
    timings_ms: deque[float] = field(default_factory=lambda: deque(maxlen=1000))


@dataclass(frozen=True)
class TimingStats:
    calls: int
    images: int
    mean_ms: float
    p50_ms: float
    p95_ms: float


class ModelRunner:
    """Loads the requested models once and runs batches of preprocessed images through them.

    Args:
        weights_dir: folder with `<name>.safetensors` + `<name>.json`; default $CXRNODE_WEIGHTS_DIR
            or `workers/weights/`.
        model_names: which models to load (default all of MODEL_NAMES, or $CXRNODE_WORKER_MODELS).
        device: "auto" (CUDA when available), "cpu" or "cuda".
        backend: CPU backend, "auto"/"onnx" (ONNX Runtime, torch fallback) or "torch".
        cache_dir: where ONNX exports are cached; default $CXRNODE_CACHE/onnx or ~/.cache/cxr-node/onnx.
        threads: intra-op threads on CPU (torch and ONNX Runtime); None = library default.
        gpu_batch_size: images per forward pass on CUDA.
        cpu_batch_size: images per forward pass on CPU; 1 by default, faster per image there
            (DESIGN.md). Benchmarks may raise it.
        micro_batch: most images one coalesced pass may hold when several threads call `predict` at
            once (`MicroBatcher`); default `gpu_batch_size` on CUDA, 1 (no coalescing) on CPU.

    Raises models.WeightsError when a requested model's weights or card are missing or do not match.
    """

    def __init__(
        self,
        weights_dir: Path | None = None,
        model_names: Iterable[str] | None = None,
        device: str | None = None,
        backend: str | None = None,
        cache_dir: Path | None = None,
        threads: int | None = None,
        gpu_batch_size: int = 8,
        cpu_batch_size: int = 1,
        micro_batch: int | None = None,
    ) -> None:
        self.weights_dir = Path(weights_dir) if weights_dir is not None else default_weights_dir()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        names = tuple(model_names) if model_names is not None else models_from_env()
        unknown = set(names) - set(MODEL_NAMES)
        if unknown:
            raise ValueError(f"unknown models {sorted(unknown)}; known: {MODEL_NAMES}")
        self.device = self._pick_device(device or os.environ.get(ENV_DEVICE, "auto"))
        self.backend_choice = (backend or os.environ.get(ENV_BACKEND, "auto")).lower()
        if self.backend_choice not in ("auto", "onnx", "torch"):
            raise ValueError(f"backend must be auto, onnx or torch, not {self.backend_choice!r}")
        env_threads = os.environ.get(ENV_THREADS)
        self.threads = threads if threads is not None else (int(env_threads) if env_threads else None)
        self.batch_size = gpu_batch_size if self.device == "cuda" else cpu_batch_size
        # Coalesce concurrent callers (thread pool) into one pass: on by default on CUDA only.
        self.micro_batch = micro_batch if micro_batch is not None else self.batch_size
        self._stats_lock = threading.Lock()
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        # CUDA: every pass on one thread (see OwnerThread), so cuDNN tunes each shape once.
        self._cuda_thread = OwnerThread("cuda-passes") if self.device == "cuda" else None
        if self.device == "cuda":
            torch.backends.cudnn.benchmark = True  # input sizes are fixed per model
        self.models: dict[str, LoadedModel] = {}
        for name in names:
            loaded = self._load(name)
            loaded.batcher = MicroBatcher(partial(self._forward, loaded), max(1, self.micro_batch))
            self.models[name] = loaded

    @staticmethod
    def _pick_device(device: str) -> str:
        import torch

        device = device.lower()
        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
        return device

    def _load(self, name: str) -> LoadedModel:
        t0 = time.perf_counter()
        module, card = models.load(name, self.weights_dir)
        spec = models.spec_from_card(card)
        try:
            transforms = tta.card_transforms(card)
        except ValueError as exc:
            raise models.WeightsError(f"{name}: card `tta`: {exc}") from None
        # Results name the algorithm by weights sha256 + architecture; TTA changes the output with the
        # same weights, so it is part of the architecture the SEG/SR report.
        extra = [t.name for t in transforms if t.kind != "identity"]
        augmented = f"+tta({' '.join(extra)})" if extra else ""
        info = ModelInfo(
            name=name,
            version=str(card.get("version") or card.get("training_date") or card["sha256"][:12]),
            sha256=card["sha256"],
            status=str(card.get("status", "experimental")),
            architecture=f"{spec.arch}/{spec.encoder}@{spec.input_size}{augmented}",
            performance=str(card.get("sr_performance", "")),
        )
        backend: Backend
        if self._cuda_thread is not None:
            backend = OnThread(TorchBackend(module, "cuda"), self._cuda_thread)
            # cuDNN picks kernels per input shape (cudnn.benchmark) on its first pass, about half a
            # second per shape on an H200: pay that here for every batch size a pass can have (the
            # micro-batcher forms any size up to its limit), not in the first jobs.
            for b in range(1, max(self.batch_size, self.micro_batch) + 1):
                backend(check_input(spec, batch=b))
        elif self.backend_choice == "torch":
            backend = TorchBackend(module, "cpu")
        else:
            backend = self._onnx_or_torch(module, spec, card["sha256"])
        log.info(
            "loaded model %s %s (%s, sha256 %s…) on %s in %.0f ms",
            name,
            info.version,
            info.architecture,
            info.sha256[:12],
            backend.name,
            (time.perf_counter() - t0) * 1000,
        )
        return LoadedModel(name=name, spec=spec, card=card, info=info, backend=backend, transforms=transforms)

    def _onnx_or_torch(self, module: Any, spec: models.ModelSpec, sha256: str) -> Backend:
        torch_backend = TorchBackend(module, "cpu")
        path = onnx_path(self.cache_dir, sha256, spec)
        if path.exists():
            try:
                return OnnxBackend(path, self.threads)
            except Exception as exc:  # noqa: BLE001 — a truncated or foreign file: export afresh
                log.warning("cached ONNX graph %s unusable (%s); exporting again", path, exc)
        try:
            export_onnx(module, spec, path)
            # Check the fresh export once, before any caller relies on it.
            probe = check_input(spec)
            onnx_backend = OnnxBackend(path, self.threads)
            diff = max_abs_diff(onnx_backend(probe), torch_backend(probe))
            if diff > ONNX_TOLERANCE:
                path.unlink(missing_ok=True)
                raise RuntimeError(f"ONNX export differs from torch by {diff:.2e} > {ONNX_TOLERANCE}")
            log.info("exported %s to %s (max |onnx - torch| = %.1e)", spec.name, path, diff)
            return onnx_backend
        except Exception as exc:  # noqa: BLE001 — any exporter/runtime failure: keep serving with torch
            log.warning("ONNX unavailable for %s (%s); running torch eager on CPU", spec.name, exc)
            return torch_backend

    # -- queries -------------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        return name in self.models

    def spec(self, name: str) -> models.ModelSpec:
        return self._get(name).spec

    def card(self, name: str) -> dict[str, Any]:
        return self._get(name).card

    def info(self, name: str) -> ModelInfo:
        return self._get(name).info

    def infos(self) -> list[ModelInfo]:
        return [m.info for m in self.models.values()]

    def backend_name(self, name: str) -> str:
        return self._get(name).backend.name

    def timings(self) -> dict[str, TimingStats]:
        """Per-model forward-pass counts since start, and times over the last 1000 passes."""
        out = {}
        for name, m in self.models.items():
            t = np.asarray(m.timings_ms or [0.0])
            out[name] = TimingStats(
                calls=m.calls,
                images=m.images,
                mean_ms=float(t.mean()),
                p50_ms=float(np.percentile(t, 50)),
                p95_ms=float(np.percentile(t, 95)),
            )
        return out

    def _get(self, name: str) -> LoadedModel:
        try:
            return self.models[name]
        except KeyError:
            raise KeyError(f"model {name!r} is not loaded by this runner (loaded: {sorted(self.models)})") from None

    # -- inference -----------------------------------------------------------------------------

    def predict(self, name: str, batch: np.ndarray) -> Prediction:
        """Probabilities for a float32 batch (N, C, S, S) preprocessed by `workers.models.preprocess`,
        averaged over the card's test-time transforms (`workers.tta`) when it lists any."""
        m = self._get(name)
        s = m.spec.input_size
        if batch.ndim != 4 or batch.shape[1:] != (m.spec.in_channels, s, s):
            raise ValueError(f"{name}: expected (N, {m.spec.in_channels}, {s}, {s}), got {batch.shape}")
        assert m.batcher is not None
        masks: list[np.ndarray] = []
        presences: list[np.ndarray] = []
        for start in range(0, batch.shape[0], self.batch_size):
            pred = tta.predict(m.batcher, batch[start : start + self.batch_size], m.transforms)
            masks.append(pred.mask)
            if pred.presence is not None:
                presences.append(pred.presence)
        return Prediction(mask=np.concatenate(masks), presence=np.concatenate(presences) if presences else None)

    def _forward(self, m: LoadedModel, x: np.ndarray) -> Prediction:
        """One forward pass (the batcher guarantees one at a time per model)."""
        t0 = time.perf_counter()
        pred = m.backend(x)
        with self._stats_lock:
            m.timings_ms.append((time.perf_counter() - t0) * 1000)
            m.calls += 1
            m.images += len(x)
        return pred
