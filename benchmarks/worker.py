"""Worker benchmark: `workers.runner.ModelRunner` + `workers.inference.analyze_batch` on this machine.

Two levels, for each CPU backend (ONNX Runtime, torch eager) and batch 1 and 4:
- forward: the network alone (the runner's backend called with a batch of N images), ms per image;
- analyze: the whole worker step for prepared 1024-pixel images (preprocessing, the three networks,
  resizing probabilities back to the image grid, severity, packed masks), ms per image and images/s,
  with the per-model step times from `AnalyzeResult.timings_ms`.
The input is a real CR of the shared test set prepared by `node.prepare` (what the node sends).
"""

from __future__ import annotations

import logging
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import DICOM_DIR, conditions
from benchmarks.weights import resolve

log = logging.getLogger(__name__)

IMAGE = "01_cr_explicit_le_mono2_12bit_2048x2500.dcm"
SEED_GPU_IMAGES_PER_S = (7.9, 12.5)  # the seed workflow on an RTX 2080 Ti (issue 4)


def _timed(fn: Any, repeats: int) -> list[float]:
    fn()  # warm-up: first call allocates and (ONNX Runtime) plans
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def gpu_info() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        return {"available": True, "name": torch.cuda.get_device_name(0)}
    return {"available": False, "note": "no CUDA device in this session: GPU throughput not measured"}


def bench_backend(backend: str, weights_dir: Path, cache: Path, image: np.ndarray, repeats: int,
                  batches: tuple[int, ...], threads: int | None = None) -> dict[str, Any]:
    import torch

    from workers.api import AnalyzeRequest
    from workers.inference import analyze_batch
    from workers.models import preprocess
    from workers.runner import ModelRunner

    t0 = time.perf_counter()
    runner = ModelRunner(weights_dir, device="cpu", backend=backend, cache_dir=cache / "onnx", threads=threads)
    load_s = time.perf_counter() - t0
    out: dict[str, Any] = {"load_s": round(load_s, 2), "torch_threads": torch.get_num_threads(),
                           "backends": {n: runner.backend_name(n) for n in runner.models}, "forward": {},
                           "analyze": {}}
    for name, model in runner.models.items():
        x1 = preprocess(image, model.spec.input_size)
        per_batch = {}
        for b in batches:
            xb = np.repeat(x1, b, axis=0)
            times = _timed(lambda xb=xb, fn=model.backend: fn(xb), repeats)
            per_batch[f"batch{b}"] = {"ms_per_image": round(statistics.median(times) / b, 1),
                                      "ms_per_call_p95": round(float(np.percentile(times, 95)), 1)}
        out["forward"][name] = {"input": model.spec.input_size, "arch": f"{model.spec.arch}/{model.spec.encoder}",
                                **per_batch}
    request = AnalyzeRequest.build("bench", image)
    for b in batches:
        steps: dict[str, list[float]] = {}

        def one(b: int = b, steps: dict[str, list[float]] = steps) -> None:
            for result in analyze_batch([request] * b, runner):
                for k, v in result.timings_ms.items():
                    steps.setdefault(k, []).append(v)

        times = _timed(one, max(1, repeats // 2))
        ms = statistics.median(times) / b
        out["analyze"][f"batch{b}"] = {
            "ms_per_image": round(ms, 1), "images_per_s": round(1000 / ms, 2),
            "step_ms_per_image": {k: round(statistics.median(v), 1) for k, v in steps.items()}}
    return out


def run(out_dir: Path, cache: Path, *, weights: str = "auto", repeats: int = 6, batches: tuple[int, ...] = (1, 4),
        backends: tuple[str, ...] = ("onnx", "onnx-1thread", "torch", "torch-1thread")) -> dict[str, Any]:
    from node.prepare import prepare

    label, weights_dir = resolve(weights, cache)
    image = prepare(DICOM_DIR / IMAGE).pixels
    before = conditions()
    # Each backend in a fresh process: ONNX Runtime's spinning thread pool and torch's OpenMP pool in one
    # process slowed torch to ~1.5 s per call on the loaded 2-core machine. torch eager is several times
    # slower on CPU: fewer repeats keep the run near two minutes.
    # "torch-1thread": one intra-op thread. With two OpenMP threads on a machine whose cores are taken
    # by other jobs, every parallel region waits for a descheduled thread (measured ~1.5 s per forward
    # pass instead of ~50 ms); one thread, or OMP_WAIT_POLICY=PASSIVE, avoids it.
    spawn = multiprocessing.get_context("spawn")
    results = {}
    for variant in backends:
        backend, _, suffix = variant.partition("-")
        threads = 1 if suffix == "1thread" else None
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            results[variant] = pool.submit(bench_backend, backend, weights_dir, cache, image,
                                           repeats if backend == "onnx" else max(2, repeats // 2), batches,
                                           threads).result(timeout=600)
    per_model = {backend: {name: {f"batch{b}": r["forward"][name][f"batch{b}"]["ms_per_image"] for b in batches}
                           for name in r["forward"]} for backend, r in results.items()}
    best = min(results, key=lambda k: results[k]["analyze"]["batch1"]["ms_per_image"])
    variants = {"onnx": "ONNX Runtime, library default threads (2)", "torch": "torch eager, default threads (2)",
                "onnx-1thread": "ONNX Runtime, 1 intra-op thread", "torch-1thread": "torch eager, 1 intra-op thread"}
    analyze1 = results[best]["analyze"]["batch1"]
    forward_sum = sum(results[best]["forward"][n]["batch1"]["ms_per_image"] for n in results[best]["forward"])
    return {
        "benchmark": "worker",
        "weights": label,
        "weights_dir": str(weights_dir),
        "image": f"{IMAGE} prepared by node.prepare to {image.shape[1]}x{image.shape[0]} uint8",
        "repeats": repeats,
        "variants": {k: variants.get(k, k) for k in results},
        "per_model_ms": per_model,
        "results": results,
        "best_cpu_backend": best,
        "cpu_images_per_s": analyze1["images_per_s"],
        "gpu": gpu_info(),
        "seed_gpu_images_per_s": SEED_GPU_IMAGES_PER_S,
        "dominant": dominant(results, best, forward_sum),
        "conditions_before": before,
        "conditions_after": conditions(),
    }


def dominant(results: dict[str, Any], best: str, forward_sum: float) -> dict[str, Any]:
    """What limits the worker, from this run's numbers."""
    analyze = results[best]["analyze"]
    b1 = analyze["batch1"]["ms_per_image"]
    slowest = max(results[best]["forward"], key=lambda n: results[best]["forward"][n]["batch1"]["ms_per_image"])
    text = (f"{best} at batch 1: the three networks take {forward_sum:.0f} of {b1:.0f} ms per image "
            f"({forward_sum / b1:.0%}); the slowest is {slowest}. The rest is preprocessing and mapping "
            "probabilities back to the 1024-pixel grid (resize, threshold, severity, packing).")
    if "batch4" in analyze:
        b4 = analyze["batch4"]["ms_per_image"]
        text += (f" analyze_batch of 4: {b4:.0f} ms per image ({'faster' if b4 < b1 else 'not faster'} than "
                 "batch 1; the CPU runner still runs the networks one image at a time).")
    speedup = {}
    for variant in ("onnx-1thread", "torch", "torch-1thread"):
        if variant in results and "onnx" in results:
            speedup[variant] = {n: round(results[variant]["forward"][n]["batch1"]["ms_per_image"]
                                         / results["onnx"]["forward"][n]["batch1"]["ms_per_image"], 2)
                                for n in results["onnx"]["forward"]}
            text += (f" {variant} / onnx time per network: "
                     + ", ".join(f"{n} {v}x" for n, v in speedup[variant].items()) + ".")
    return {"networks_share_of_analyze": round(forward_sum / b1, 2), "slowest_model": slowest,
            "torch_over_onnx_time": speedup, "text": text}
