"""The GPU path of the worker: `ModelRunner(device="cuda")` (torch, fp16 autocast), its MicroBatcher,
`analyze_batch` on CUDA, and mixed-precision training, each against the CPU fp32 result.

Every case is parametrized over ["cpu", "cuda"]: the CUDA case is skipped where torch sees no CUDA
device, the CPU case runs the same code and assertions everywhere (CPU torch against itself), so the
test logic is proven on machines without a GPU. Self-contained on purpose (no tests/conftest.py
fixtures, nothing of node/, pydicom or celery), so that a bare GPU machine runs it with

    CXR_SHARED_DATA=<data> python -m pytest --noconftest -p no:cacheprovider tests/unit/test_runner_cuda.py
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.paths import shared_data
from tests.support.synthetic_lungs import lung_folder
from tests.support.tiny_models import TINY_SIZE, write_tiny_weights
from workers import models
from workers.api import MODEL_NAMES, AnalyzeRequest, AnalyzeResult, unpack_mask
from workers.backends import CUDA_FP16_TOLERANCE, Prediction, check_input, max_abs_diff
from workers.inference import analyze_batch
from workers.runner import ModelRunner, default_weights_dir

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device"))]
# Shipped models (card and weights both present: a GPU machine may carry only some of them).
SHIPPED = [
    n
    for n in MODEL_NAMES
    if models.card_path(n, default_weights_dir()).exists() and models.weights_path(n, default_weights_dir()).exists()
]
#: Side of the request grid in the analyze tests (the node sends 1024; smaller keeps the CPU case fast).
GRID = 256
#: Least share of equal pixels between two thresholded masks of random tiny models: their logits
#: are all near 0, so a pixel flips wherever fp16 moves one across the threshold.
TINY_AGREEMENT = 0.99
#: Least Dice between the CUDA and CPU masks of trained models (decided, far-from-threshold pixels).
MIN_DICE = 0.99


def tolerance(device: str) -> float:
    """CPU torch against CPU torch is the same arithmetic; CUDA runs fp16 autocast."""
    return CUDA_FP16_TOLERANCE if device == "cuda" else 1e-5


def jsrt_images(n: int, side: int | None = None) -> list[np.ndarray]:
    """The first `n` JSRT chest radiographs (uint8), optionally resized to side x side; skips if absent."""
    files = sorted((shared_data() / "lung" / "jsrt" / "images").glob("*.png"))[:n]
    if len(files) < n:
        pytest.skip(f"JSRT images not found under {shared_data()} (set CXR_SHARED_DATA)")
    images = [Image.open(f).convert("L") for f in files]
    if side is not None:
        images = [im.resize((side, side), Image.Resampling.BILINEAR) for im in images]
    return [np.asarray(im) for im in images]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2 * int((a & b).sum()) / total


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def cpu_reference(tiny_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelRunner:
    """The fp32 reference: torch eager on CPU."""
    return ModelRunner(
        tiny_weights, device="cpu", backend="torch", cache_dir=tmp_path_factory.mktemp("cache"), threads=1
    )


def runner_on(
    device: str,
    weights: Path,
    cache: Path,
    model_names: list[str] | None = None,
    gpu_batch_size: int = 8,
    micro_batch: int | None = None,
) -> ModelRunner:
    """The runner under test; `backend="torch"` matters on CPU only (CUDA always runs torch)."""
    return ModelRunner(
        weights,
        model_names=model_names,
        device=device,
        backend="torch",
        cache_dir=cache,
        threads=1,
        gpu_batch_size=gpu_batch_size,
        micro_batch=micro_batch,
    )


# -- a) tiny models: CUDA fp16 against CPU fp32 --------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_tiny_model_on_device_equals_cpu(
    device: str, name: str, tiny_weights: Path, cpu_reference: ModelRunner, tmp_path: Path
) -> None:
    runner = runner_on(device, tiny_weights, tmp_path, model_names=[name])
    assert runner.device == device and runner.backend_name(name) == f"torch-{device}"
    x = check_input(runner.spec(name), batch=3)
    got, ref = runner.predict(name, x), cpu_reference.predict(name, x)
    assert got.mask.shape == ref.mask.shape == (3, 1, TINY_SIZE, TINY_SIZE)
    assert got.mask.dtype == np.float32 and np.isfinite(got.mask).all()
    assert (got.presence is None) == (ref.presence is None) == (name != "pneumothorax")
    assert max_abs_diff(got, ref) < tolerance(device)


# -- b) shipped models on real radiographs ---------------------------------------------------------


@pytest.mark.skipif(not SHIPPED, reason="no model shipped in workers/weights")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_on_device_equals_cpu_on_real_images(device: str, name: str, tmp_path: Path) -> None:
    images = jsrt_images(2)
    runner = ModelRunner(model_names=[name], device=device, backend="torch", cache_dir=tmp_path)
    reference = ModelRunner(model_names=[name], device="cpu", backend="torch", cache_dir=tmp_path)
    size = runner.spec(name).input_size
    x = np.concatenate([models.preprocess(img, size) for img in images])
    got, ref = runner.predict(name, x), reference.predict(name, x)
    diff = max_abs_diff(got, ref)
    assert diff < tolerance(device), f"{name}: max |{device} - cpu| = {diff:.4f}"
    threshold = float(runner.card(name).get("threshold", 0.5))
    for i in range(len(images)):
        for ch in range(got.mask.shape[1]):
            d = dice(got.mask[i, ch] > threshold, ref.mask[i, ch] > threshold)
            assert d > MIN_DICE, f"{name} image {i} channel {ch}: Dice {d:.4f}"


# -- c) concurrent callers coalesced by the MicroBatcher --------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_concurrent_callers_share_one_forward_pass(device: str, tiny_weights: Path, tmp_path: Path) -> None:
    name, callers = "pneumothorax", 8
    runner = runner_on(device, tiny_weights, tmp_path, model_names=[name], gpu_batch_size=callers, micro_batch=callers)
    x = check_input(runner.spec(name), batch=callers)
    alone = [runner.predict(name, x[i : i + 1]) for i in range(callers)]
    before = runner.timings()[name]
    batcher = runner.models[name].batcher
    assert batcher is not None and batcher.max_batch == callers
    results: dict[int, Prediction] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(callers)

    def call(i: int) -> None:
        try:
            barrier.wait(30)
            results[i] = runner.predict(name, x[i : i + 1])
        except BaseException as exc:  # noqa: BLE001 — surfaced by the assertion below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,), name=f"caller-{i}") for i in range(callers)]
    # Hold the model (as a long pass in progress would) until all eight callers are queued: the
    # overlap is then certain rather than a matter of thread timing.
    batcher._run_lock.acquire()
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(batcher._queue) < callers and time.monotonic() < deadline and not errors:
            time.sleep(0.01)
        assert len(batcher._queue) == callers, f"only {len(batcher._queue)} callers queued; errors: {errors}"
    finally:
        batcher._run_lock.release()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(results) == list(range(callers))
    for i in range(callers):
        assert results[i].mask.shape == (1, 1, TINY_SIZE, TINY_SIZE)
        assert max_abs_diff(results[i], alone[i]) < tolerance(device)  # each caller gets its own rows
    after = runner.timings()[name]
    assert after.images - before.images == callers
    assert after.calls - before.calls == 1  # eight images, one forward pass


# -- d) the whole worker step -------------------------------------------------------------------------


def _requests(images: list[np.ndarray], names: tuple[str, ...]) -> list[AnalyzeRequest]:
    return [AnalyzeRequest.build(f"job{i}", img, models=names) for i, img in enumerate(images)]


def _masks(result: AnalyzeResult) -> dict[str, np.ndarray]:
    return {k: unpack_mask(v, result.rows, result.cols) for k, v in result.masks.items()}


@pytest.mark.parametrize("device", DEVICES)
def test_analyze_batch_on_device_equals_cpu_with_tiny_models(
    device: str, tiny_weights: Path, cpu_reference: ModelRunner, tmp_path: Path
) -> None:
    images = jsrt_images(2, GRID)
    runner = runner_on(device, tiny_weights, tmp_path)
    requests = _requests(images, MODEL_NAMES)
    got, ref = analyze_batch(requests, runner), analyze_batch(requests, cpu_reference)
    zone_threshold = float(cpu_reference.card("opacity").get("zone_threshold", 0.3))
    for g, r in zip(got, ref, strict=True):
        assert (g.job_id, g.rows, g.cols) == (r.job_id, r.rows, r.cols) == (r.job_id, GRID, GRID)
        assert [m.sha256 for m in g.models] == [m.sha256 for m in r.models]
        gm, rm = _masks(g), _masks(r)
        assert set(gm) == set(rm) == {"right_lung", "left_lung", "opacity", "pneumothorax"}
        for key in ("opacity", "pneumothorax"):
            assert (gm[key] == rm[key]).mean() >= TINY_AGREEMENT, key
        lungs_g, lungs_r = gm["right_lung"] | gm["left_lung"], rm["right_lung"] | rm["left_lung"]
        assert (lungs_g == lungs_r).mean() >= TINY_AGREEMENT
        assert r.pneumothorax_probability is not None and g.pneumothorax_probability is not None
        assert abs(g.pneumothorax_probability - r.pneumothorax_probability) < tolerance(device)
        # The score counts zones over a threshold: it must be the same wherever no zone lies on the edge.
        assert r.severity_score is not None and g.severity_score is not None
        assert r.zone_fractions is not None and g.zone_fractions is not None
        if all(abs(f - zone_threshold) > 0.05 for f in r.zone_fractions):
            assert g.severity_score == r.severity_score
            assert np.allclose(g.zone_fractions, r.zone_fractions, atol=0.05)


@pytest.mark.skipif("lung" not in SHIPPED, reason="the lung model is not shipped in workers/weights")
@pytest.mark.parametrize("device", DEVICES)
def test_analyze_batch_on_device_equals_cpu_with_the_shipped_lung_model(device: str, tmp_path: Path) -> None:
    images = jsrt_images(2, GRID)
    runner = ModelRunner(model_names=["lung"], device=device, backend="torch", cache_dir=tmp_path)
    reference = ModelRunner(model_names=["lung"], device="cpu", backend="torch", cache_dir=tmp_path)
    requests = _requests(images, ("lung",))
    got, ref = analyze_batch(requests, runner), analyze_batch(requests, reference)
    for g, r in zip(got, ref, strict=True):
        gm, rm = _masks(g), _masks(r)
        assert set(gm) == set(rm) == {"right_lung", "left_lung"}
        for key in gm:
            assert rm[key].sum() > 0.02 * GRID * GRID, f"the trained model finds the {key}"
            assert dice(gm[key], rm[key]) > MIN_DICE, key
        assert g.lung_area_px is not None and r.lung_area_px is not None
        for side in ("right", "left"):
            assert g.lung_area_px[side] == pytest.approx(r.lung_area_px[side], rel=0.01)
        assert g.warnings == r.warnings


# -- e) training in mixed precision ---------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_training_runs_on_device_and_its_checkpoints_load_on_cpu(device: str, tmp_path: Path) -> None:
    train_module = pytest.importorskip("training.train", reason="training needs albumentations, cv2 and tqdm")
    spec = dataclasses.replace(models.SPECS["lung"], input_size=TINY_SIZE)
    run = tmp_path / "run"
    cfg = train_module.TrainConfig(
        spec=spec,
        structures=("lungs",),
        data=[lung_folder(tmp_path / "lungs")],
        run_dir=run,
        epochs=2,
        batch_size=4,
        max_steps=2,
        lr=3e-3,
        warmup_steps=1,
        val_fraction=0.0,
        patience=100,
        augment=False,
        threads=1,
        device=device,
    )
    summary = train_module.train(cfg)
    assert summary["epochs"] == 2 and math.isfinite(summary["best_val_select"])
    history = (run / "history.json").read_text()
    assert "NaN" not in history and "Infinity" not in history  # loss and validation finite every epoch

    last = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=False)
    # Mixed precision keeps its loss scale in the checkpoint so a resume goes on with it; on CPU the
    # scaler is disabled and saves nothing.
    if device == "cuda":
        assert last["scaler"]["scale"] > 0 and "_growth_tracker" in last["scaler"]
    else:
        assert last["scaler"] == {}
    assert last["state"]["step"] == 4 and last["state"]["epoch"] == 2
    for ckpt in (last, best):
        module = models.build(spec)
        module.load_state_dict(ckpt["model"])
        assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
        with torch.inference_mode():
            out = module.eval()(torch.from_numpy(check_input(spec, batch=1)))
        assert out.shape == (1, 1, TINY_SIZE, TINY_SIZE) and torch.isfinite(out).all()


@pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device")
def test_cuda_runner_tunes_every_batch_size_a_pass_can_have_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cuDNN tunes each new input shape on its first pass: the runner pays that at load for every size
    the micro-batcher can form, so that no job does."""
    from workers.backends import TorchBackend

    sizes: list[int] = []
    threads: set[int] = set()
    forward = TorchBackend.__call__

    def counting(self: TorchBackend, x: np.ndarray) -> Prediction:
        sizes.append(len(x))
        threads.add(threading.get_ident())
        return forward(self, x)

    monkeypatch.setattr(TorchBackend, "__call__", counting)
    write_tiny_weights(tmp_path, names=("lung",))
    runner = ModelRunner(tmp_path, model_names=["lung"], device="cuda", gpu_batch_size=4, micro_batch=6)
    assert sorted(set(sizes)) == [1, 2, 3, 4, 5, 6]
    assert runner.timings()["lung"].calls == 0  # warm-up passes are not counted as work
    # Passes asked for by any thread run on the one thread that tuned them (the cuDNN choices are
    # kept per thread).
    x = check_input(runner.spec("lung"), batch=1)
    callers = [threading.Thread(target=runner.predict, args=("lung", x)) for _ in range(3)]
    for c in callers:
        c.start()
    runner.predict("lung", x)
    for c in callers:
        c.join()
    assert len(threads) == 1 and threading.get_ident() not in threads
