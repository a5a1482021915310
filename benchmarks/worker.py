"""Worker benchmark: `workers.runner.ModelRunner` + `workers.inference.analyze_batch` on this machine.

Two levels, for each CPU backend (ONNX Runtime, torch eager) and batch 1 and 4:
- forward: the network alone (the runner's backend called with a batch of N images), ms per image;
- analyze: the whole worker step for prepared 1024-pixel images (preprocessing, the three networks,
  resizing probabilities back to the image grid, severity, packed masks), ms per image and images/s,
  with the per-model step times from `AnalyzeResult.timings_ms`.
The input is a real CR of the shared test set prepared by `node.analysis.prepare` (what the node sends), or
with `--image PATH` a plain picture (PNG) prepared the same way (grey levels scaled to 0-1, resized
to a 1024-pixel long side), for machines without the shared DICOM set or pydicom.

When CUDA is present, a GPU section: `ModelRunner(device="cuda")` (torch, fp16 autocast): forward ms
per image at batch 1, 8 and 32 per model; `analyze_batch` images/s at batch 1 and 8; 8 threads calling
one image at a time through the MicroBatcher (as a `--pool threads` worker does), images/s and the
images per forward pass that achieved; peak CUDA memory; the ratio to the seed's RTX 2080 Ti figures.
The GPU section alone, quickly (under a minute), on a machine with only torch/smp/numpy/PIL:

    python -m benchmarks.worker --gpu-only --weights random --image chest.png --out bench-results
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import statistics
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import DICOM_DIR, conditions, write_json
from benchmarks.weights import resolve

log = logging.getLogger(__name__)

IMAGE = "01_cr_explicit_le_mono2_12bit_2048x2500.dcm"
SEED_GPU_IMAGES_PER_S = (7.9, 12.5)  # the seed workflow on an RTX 2080 Ti (issue 4)
LONG_SIDE = 1024  # node.analysis.prepare's default grid
GPU_FORWARD_BATCHES = (1, 8, 32)
GPU_ANALYZE_BATCHES = (1, 8)
GPU_CALLERS = 8  # threads of a `--pool threads -c 8` GPU worker
DEFAULT_CACHE = Path(os.environ.get("CXRNODE_BENCH_CACHE", "/tmp/cxrnode-bench-cache"))  # as benchmarks.__main__


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


def image_from_file(path: Path, long_side: int = LONG_SIDE) -> np.ndarray:
    """A plain picture as the node would send it: grey levels scaled to 0-1 and resized (Lanczos) to a
    `long_side` long side, then uint8 (node.analysis.prepare's resize of a DICOM without padding)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("L") if im.mode not in ("L", "I", "I;16", "F") else im)
    full_scale = 255.0 if arr.dtype == np.uint8 else float(max(1, arr.max()))
    image = arr.astype(np.float32) / full_scale
    h, w = image.shape
    scale = long_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL wants (width, height)
    resized = Image.fromarray(image).resize(size, Image.Resampling.LANCZOS)
    return np.clip(np.rint(np.asarray(resized) * 255.0), 0, 255).astype(np.uint8)


def bench_image(path: Path | None) -> tuple[np.ndarray, str]:
    """(prepared uint8 pixels, description): the shared DICOM by default, else the given picture."""
    if path is None:
        from node.analysis.prepare import prepare  # pydicom: only for the default DICOM input

        image = prepare(DICOM_DIR / IMAGE).pixels
        return image, f"{IMAGE} prepared by node.analysis.prepare to {image.shape[1]}x{image.shape[0]} uint8"
    image = image_from_file(path)
    return image, f"{path.name} resized like node.analysis.prepare to {image.shape[1]}x{image.shape[0]} uint8"


def bench_backend(
    backend: str,
    weights_dir: Path,
    cache: Path,
    image: np.ndarray,
    repeats: int,
    batches: tuple[int, ...],
    threads: int | None = None,
) -> dict[str, Any]:
    import torch

    from workers.api import AnalyzeRequest
    from workers.runner import ModelRunner

    t0 = time.perf_counter()
    runner = ModelRunner(weights_dir, device="cpu", backend=backend, cache_dir=cache / "onnx", threads=threads)
    load_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "load_s": round(load_s, 2),
        "torch_threads": torch.get_num_threads(),
        "backends": {n: runner.backend_name(n) for n in runner.models},
        "forward": {},
        "analyze": {},
    }
    for name, model in runner.models.items():
        out["forward"][name] = forward_figures(model, image, batches, repeats, digits=1)
    request = AnalyzeRequest.build("bench", image)
    for b in batches:
        out["analyze"][f"batch{b}"] = analyze_figures(runner, request, b, max(1, repeats // 2))
    return out


def forward_figures(model: Any, image: np.ndarray, batches: Sequence[int], repeats: int, digits: int) -> dict[str, Any]:
    """The network alone (the runner's backend) on `image` repeated to each batch size: ms per image."""
    from workers.models import preprocess

    x1 = preprocess(image, model.spec.input_size)
    per_batch = {}
    for b in batches:
        xb = np.repeat(x1, b, axis=0)
        times = _timed(lambda xb=xb, fn=model.backend: fn(xb), repeats)
        per_batch[f"batch{b}"] = {
            "ms_per_image": round(statistics.median(times) / b, digits),
            "ms_per_call_p95": round(float(np.percentile(times, 95)), digits),
        }
    return {"input": model.spec.input_size, "arch": f"{model.spec.arch}/{model.spec.encoder}", **per_batch}


def analyze_figures(runner: Any, request: Any, batch: int, repeats: int) -> dict[str, Any]:
    """The whole worker step (`analyze_batch`) on `batch` copies of the request: ms per image, images/s
    and each model's step time."""
    from workers.inference import analyze_batch

    steps: dict[str, list[float]] = {}

    def one() -> None:
        for result in analyze_batch([request] * batch, runner):
            for k, v in result.timings_ms.items():
                steps.setdefault(k, []).append(v)

    ms = statistics.median(_timed(one, repeats)) / batch
    return {
        "ms_per_image": round(ms, 1),
        "images_per_s": round(1000 / ms, 2),
        "step_ms_per_image": {k: round(statistics.median(v), 1) for k, v in steps.items()},
    }


def _concurrent_callers(runner: Any, request: Any, callers: int, per_caller: int) -> dict[str, Any]:
    """`callers` threads each analysing one image at a time, all at once: images/s, and how many
    images the MicroBatcher put into each forward pass."""
    from workers.inference import analyze_batch

    before = runner.timings()
    barrier = threading.Barrier(callers + 1)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            barrier.wait(60)
            for _ in range(per_caller):
                analyze_batch([request], runner)
        except BaseException as exc:  # noqa: BLE001 — re-raised below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=work, name=f"caller-{i}") for i in range(callers)]
    for t in threads:
        t.start()
    barrier.wait(60)
    t0 = time.perf_counter()
    for t in threads:
        t.join(600)
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    after = runner.timings()
    images = callers * per_caller
    return {
        "callers": callers,
        "images": images,
        "wall_s": round(wall, 2),
        "images_per_s": round(images / wall, 2),
        "images_per_forward_pass": {
            n: round((after[n].images - before[n].images) / max(1, after[n].calls - before[n].calls), 2) for n in after
        },
    }


def bench_gpu(
    weights_dir: Path,
    cache: Path,
    image: np.ndarray,
    repeats: int,
    forward_batches: tuple[int, ...] = GPU_FORWARD_BATCHES,
    analyze_batches: tuple[int, ...] = GPU_ANALYZE_BATCHES,
    callers: int = GPU_CALLERS,
    device: str = "cuda",
) -> dict[str, Any]:
    """The CUDA runner as a GPU worker runs it (default `gpu_batch_size`). Times include the copy to the
    GPU and the probabilities' copy back, which also waits for the GPU to finish. (`device="cpu"`
    runs the same steps with CPU torch: only to check this code on a machine without a GPU.)"""
    import torch

    from workers.api import AnalyzeRequest
    from workers.runner import ModelRunner

    # Stand-in weights find implausible lungs in every image: one warning per job would drown the log.
    logging.getLogger("workers.inference").setLevel(logging.ERROR)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    runner = ModelRunner(
        weights_dir, device=device, backend="torch", cache_dir=cache / "onnx", micro_batch=None if cuda else callers
    )
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "load_s": round(time.perf_counter() - t0, 2),
        "gpu_batch_size": runner.batch_size,
        "backends": {n: runner.backend_name(n) for n in runner.models},
        "forward": {},
        "analyze": {},
    }
    for name, model in runner.models.items():
        out["forward"][name] = forward_figures(model, image, forward_batches, repeats, digits=2)
    request = AnalyzeRequest.build("bench", image)
    for b in analyze_batches:
        out["analyze"][f"batch{b}"] = analyze_figures(runner, request, b, max(2, repeats // 2))
    out["concurrent"] = _concurrent_callers(runner, request, callers, per_caller=max(2, repeats // 2))
    out["peak_memory_mb"] = {
        "allocated": round(torch.cuda.max_memory_allocated() / 1e6, 1) if cuda else None,
        "reserved": round(torch.cuda.max_memory_reserved() / 1e6, 1) if cuda else None,
    }
    return out


def gpu_headline(results: dict[str, Any]) -> dict[str, Any]:
    """The GPU figures that go into summary.json, with the ratio to the seed's RTX 2080 Ti."""
    rates = {f"analyze_{k}": v["images_per_s"] for k, v in results["analyze"].items()}
    rates[f"concurrent_{results['concurrent']['callers']}_callers"] = results["concurrent"]["images_per_s"]
    best = max(rates, key=lambda k: rates[k])
    return {
        "available": True,
        "name": results["device"],
        "images_per_s": rates,
        "best": best,
        "ratio_to_seed": {f"{seed}_images_per_s": round(rates[best] / seed, 2) for seed in SEED_GPU_IMAGES_PER_S},
        "peak_memory_mb": results["peak_memory_mb"]["allocated"],
        "text": (
            f"best {rates[best]:.1f} images/s ({best}) on {results['device']} against the seed's "
            f"{SEED_GPU_IMAGES_PER_S[0]}-{SEED_GPU_IMAGES_PER_S[1]} images/s on an RTX 2080 Ti"
        ),
    }


def _in_fresh_process(fn: Any, *args: Any) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        result: dict[str, Any] = pool.submit(fn, *args).result(timeout=600)
    return result


def run_gpu(
    out_dir: Path, cache: Path, *, weights: str = "auto", repeats: int = 10, image_path: Path | None = None
) -> dict[str, Any]:
    """The GPU section alone (`--gpu-only`); without CUDA it says so and measures nothing."""
    info = gpu_info()
    data: dict[str, Any] = {"benchmark": "worker-gpu", "gpu": info, "seed_gpu_images_per_s": SEED_GPU_IMAGES_PER_S}
    if not info["available"]:
        log.warning("no CUDA device: the GPU benchmark measured nothing")
        return data
    label, weights_dir = resolve(weights, cache)
    image, described = bench_image(image_path)
    before = conditions()
    results = _in_fresh_process(bench_gpu, weights_dir, cache, image, repeats)
    return data | {
        "weights": label,
        "weights_dir": str(weights_dir),
        "image": described,
        "repeats": repeats,
        "gpu": gpu_headline(results),
        "gpu_results": results,
        "conditions_before": before,
        "conditions_after": conditions(),
    }


def run(
    out_dir: Path,
    cache: Path,
    *,
    weights: str = "auto",
    repeats: int = 6,
    batches: tuple[int, ...] = (1, 4),
    backends: tuple[str, ...] = ("onnx", "onnx-1thread", "torch", "torch-1thread"),
    image_path: Path | None = None,
) -> dict[str, Any]:
    label, weights_dir = resolve(weights, cache)
    image, described = bench_image(image_path)
    before = conditions()
    # Each backend in a fresh process: ONNX Runtime's spinning thread pool and torch's OpenMP pool in one
    # process slowed torch to ~1.5 s per call on the loaded 2-core machine. torch eager is several times
    # slower on CPU: fewer repeats keep the run near two minutes.
    # "torch-1thread": one intra-op thread. With two OpenMP threads on a machine whose cores are taken
    # by other jobs, every parallel region waits for a descheduled thread (measured ~1.5 s per forward
    # pass instead of ~50 ms); one thread, or OMP_WAIT_POLICY=PASSIVE, avoids it.
    results = {}
    for variant in backends:
        backend, _, suffix = variant.partition("-")
        threads = 1 if suffix == "1thread" else None
        results[variant] = _in_fresh_process(
            bench_backend,
            backend,
            weights_dir,
            cache,
            image,
            repeats if backend == "onnx" else max(2, repeats // 2),
            batches,
            threads,
        )
    per_model = {
        backend: {
            name: {f"batch{b}": r["forward"][name][f"batch{b}"]["ms_per_image"] for b in batches}
            for name in r["forward"]
        }
        for backend, r in results.items()
    }
    best = min(results, key=lambda k: results[k]["analyze"]["batch1"]["ms_per_image"])
    variants = {
        "onnx": "ONNX Runtime, library default threads (2)",
        "torch": "torch eager, default threads (2)",
        "onnx-1thread": "ONNX Runtime, 1 intra-op thread",
        "torch-1thread": "torch eager, 1 intra-op thread",
    }
    analyze1 = results[best]["analyze"]["batch1"]
    forward_sum = sum(results[best]["forward"][n]["batch1"]["ms_per_image"] for n in results[best]["forward"])
    gpu: dict[str, Any] = gpu_info()
    gpu_results = None
    if gpu["available"]:
        gpu_results = _in_fresh_process(bench_gpu, weights_dir, cache, image, repeats)
        gpu = gpu_headline(gpu_results)
    return {
        "benchmark": "worker",
        "weights": label,
        "weights_dir": str(weights_dir),
        "image": described,
        "repeats": repeats,
        "variants": {k: variants.get(k, k) for k in results},
        "per_model_ms": per_model,
        "results": results,
        "best_cpu_backend": best,
        "cpu_images_per_s": analyze1["images_per_s"],
        "gpu": gpu,
        "gpu_results": gpu_results,
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
    text = (
        f"{best} at batch 1: the three networks take {forward_sum:.0f} of {b1:.0f} ms per image "
        f"({forward_sum / b1:.0%}); the slowest is {slowest}. The rest is preprocessing and mapping "
        "probabilities back to the 1024-pixel grid (resize, threshold, severity, packing)."
    )
    if "batch4" in analyze:
        b4 = analyze["batch4"]["ms_per_image"]
        text += (
            f" analyze_batch of 4: {b4:.0f} ms per image ({'faster' if b4 < b1 else 'not faster'} than "
            "batch 1; the CPU runner still runs the networks one image at a time)."
        )
    speedup = {}
    for variant in ("onnx-1thread", "torch", "torch-1thread"):
        if variant in results and "onnx" in results:
            speedup[variant] = {
                n: round(
                    results[variant]["forward"][n]["batch1"]["ms_per_image"]
                    / results["onnx"]["forward"][n]["batch1"]["ms_per_image"],
                    2,
                )
                for n in results["onnx"]["forward"]
            }
            text += (
                f" {variant} / onnx time per network: "
                + ", ".join(f"{n} {v}x" for n, v in speedup[variant].items())
                + "."
            )
    return {
        "networks_share_of_analyze": round(forward_sum / b1, 2),
        "slowest_model": slowest,
        "torch_over_onnx_time": speedup,
        "text": text,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m benchmarks.worker [--gpu-only] [--image PATH]`: this benchmark alone, importing neither
    the node (unless the default DICOM input is used) nor the other benchmarks."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.worker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the JSON result")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where stand-in weights are kept")
    parser.add_argument(
        "--weights",
        choices=("auto", "shipped", "random", "tiny"),
        default="auto",
        help="shipped (workers/weights), random (full-size, untrained: same speed), tiny; "
        "auto = shipped if all three are present",
    )
    parser.add_argument(
        "--image", type=Path, default=None, help=f"a plain picture (PNG) as input instead of the shared DICOM {IMAGE}"
    )
    parser.add_argument(
        "--gpu-only",
        action="store_true",
        help="only the CUDA section (writes worker-gpu.json); says so and exits 0 without CUDA",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per figure")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.monotonic()
    if args.gpu_only:
        data = run_gpu(args.out, args.cache, weights=args.weights, repeats=args.repeats or 10, image_path=args.image)
    else:
        data = run(args.out, args.cache, weights=args.weights, repeats=args.repeats or 6, image_path=args.image)
    data["runtime_s"] = round(time.monotonic() - t0, 1)
    path = write_json(args.out, data["benchmark"], data)
    log.info("wrote %s (%.0f s): gpu %s", path, data["runtime_s"], data["gpu"])
    return 0


if __name__ == "__main__":
    # Run main() of the imported module, not of __main__: the spawned GPU process then unpickles
    # `benchmarks.worker.bench_gpu` by its real name.
    from benchmarks.worker import main as _main

    raise SystemExit(_main())
