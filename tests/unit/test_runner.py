"""ModelRunner: weight checks, ONNX export equal to torch, cache keyed by sha256, torch fallback."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.support.net import wait_for
from tests.support.tiny_models import TINY_SIZE, write_tiny_weights
from workers import models
from workers.backends import (
    ONNX_TOLERANCE,
    OnThread,
    OwnerThread,
    Prediction,
    check_input,
    max_abs_diff,
    onnx_path,
)
from workers.batching import MicroBatcher
from workers.runner import ModelRunner


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def onnx_runner(weights: Path, cache: Path) -> ModelRunner:
    return ModelRunner(weights, device="cpu", backend="onnx", cache_dir=cache, threads=1)


@pytest.fixture(scope="module")
def torch_runner(weights: Path, cache: Path) -> ModelRunner:
    return ModelRunner(weights, device="cpu", backend="torch", cache_dir=cache, threads=1)


def test_missing_weights_raise_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(models.WeightsError, match=r"model card .*lung\.json is missing"):
        ModelRunner(tmp_path, model_names=["lung"], device="cpu", cache_dir=tmp_path / "c")
    write_tiny_weights(tmp_path, names=("lung",))
    models.weights_path("lung", tmp_path).unlink()
    with pytest.raises(models.WeightsError, match=r"lung\.safetensors are missing"):
        ModelRunner(tmp_path, model_names=["lung"], device="cpu", cache_dir=tmp_path / "c")


def test_weights_that_do_not_match_their_card_are_refused(tmp_path: Path) -> None:
    write_tiny_weights(tmp_path, names=("lung",))
    path = models.weights_path("lung", tmp_path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a weight
    path.write_bytes(bytes(data))
    with pytest.raises(models.WeightsError, match="does not match its card"):
        ModelRunner(tmp_path, model_names=["lung"], device="cpu", cache_dir=tmp_path / "c")


def test_unknown_model_and_bad_backend_are_refused(weights: Path) -> None:
    with pytest.raises(ValueError, match="unknown models"):
        ModelRunner(weights, model_names=["heart"], device="cpu")
    with pytest.raises(ValueError, match="backend"):
        ModelRunner(weights, model_names=["lung"], device="cpu", backend="tensorrt")


@pytest.mark.parametrize("name", ["lung", "opacity", "pneumothorax"])
def test_onnx_equals_torch_within_tolerance(onnx_runner: ModelRunner, torch_runner: ModelRunner, name: str) -> None:
    assert onnx_runner.backend_name(name) == "onnx-cpu"
    assert torch_runner.backend_name(name) == "torch-cpu"
    x = check_input(onnx_runner.spec(name), batch=3)
    a, b = onnx_runner.predict(name, x), torch_runner.predict(name, x)
    assert a.mask.shape == (3, 1, TINY_SIZE, TINY_SIZE)
    assert (a.presence is not None) == (name == "pneumothorax") == (b.presence is not None)
    assert max_abs_diff(a, b) < ONNX_TOLERANCE
    assert a.mask.min() >= 0.0 and a.mask.max() <= 1.0  # probabilities, not logits


def test_onnx_cache_is_keyed_by_weights_sha(
    weights: Path, cache: Path, onnx_runner: ModelRunner, tmp_path: Path
) -> None:
    sha = onnx_runner.info("lung").sha256
    cached = onnx_path(cache, sha, onnx_runner.spec("lung"))
    assert cached.exists()
    mtime = cached.stat().st_mtime_ns
    again = ModelRunner(weights, model_names=["lung"], device="cpu", cache_dir=cache)
    assert again.backend_name("lung") == "onnx-cpu" and cached.stat().st_mtime_ns == mtime  # reused

    # Retrained weights (new sha) never run the old graph.
    retrained = write_tiny_weights(tmp_path / "w2", names=("lung",), seed=1)
    fresh = ModelRunner(retrained, model_names=["lung"], device="cpu", cache_dir=cache)
    assert fresh.info("lung").sha256 != sha
    assert onnx_path(cache, fresh.info("lung").sha256, fresh.spec("lung")).exists()
    x = check_input(fresh.spec("lung"))
    assert max_abs_diff(fresh.predict("lung", x), onnx_runner.predict("lung", x)) > ONNX_TOLERANCE


def test_corrupt_cached_graph_is_exported_again(
    weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    card = models.read_card("lung", weights)
    bad = onnx_path(tmp_path, card["sha256"], models.spec_from_card(card))
    bad.write_bytes(b"not an onnx graph")
    with caplog.at_level(logging.WARNING, logger="workers.runner"):
        runner = ModelRunner(weights, model_names=["lung"], device="cpu", cache_dir=tmp_path)
    assert runner.backend_name("lung") == "onnx-cpu"
    assert "unusable" in caplog.text
    assert bad.stat().st_size > 1000


def test_export_failure_falls_back_to_torch(weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="workers.runner"):
        runner = ModelRunner(weights, model_names=["lung"], device="cpu", cache_dir=blocker)
    assert runner.backend_name("lung") == "torch-cpu"
    assert "running torch eager" in caplog.text
    assert runner.predict("lung", check_input(runner.spec("lung"), batch=1)).mask.shape == (1, 1, 64, 64)


def test_infos_and_timings(onnx_runner: ModelRunner) -> None:
    infos = {i.name: i for i in onnx_runner.infos()}
    assert set(infos) == {"lung", "opacity", "pneumothorax"}
    card = onnx_runner.card("pneumothorax")
    assert infos["pneumothorax"].sha256 == card["sha256"] and len(card["sha256"]) == 64
    assert infos["pneumothorax"].version == "tiny-0" and infos["pneumothorax"].status == "experimental"
    spec = models.SPECS["pneumothorax"]
    assert infos["pneumothorax"].architecture == f"{spec.arch}/{spec.encoder}@{TINY_SIZE}"
    before = onnx_runner.timings()["lung"]
    onnx_runner.predict("lung", check_input(onnx_runner.spec("lung"), batch=2))
    after = onnx_runner.timings()["lung"]
    # CPU runs one image per forward pass: two images, two calls.
    assert (after.calls - before.calls, after.images - before.images) == (2, 2)
    assert after.p95_ms >= after.p50_ms > 0


def test_predict_rejects_wrong_shapes(onnx_runner: ModelRunner) -> None:
    with pytest.raises(ValueError, match="expected"):
        onnx_runner.predict("lung", np.zeros((1, 1, 32, 32), np.float32))
    with pytest.raises(KeyError, match="not loaded"):
        ModelRunner(
            onnx_runner.weights_dir, model_names=["lung"], device="cpu", cache_dir=onnx_runner.cache_dir
        ).predict("opacity", np.zeros((1, 1, 64, 64), np.float32))


def test_same_weights_at_another_input_size_get_their_own_graph(tmp_path: Path) -> None:
    # Identical weights (same seed) under a card with a different input size: same sha256, but the
    # cached 64x64 graph must not be reused for 96x96 inputs.
    small = ModelRunner(
        write_tiny_weights(tmp_path / "a", names=("lung",)),
        model_names=["lung"],
        device="cpu",
        cache_dir=tmp_path / "c",
    )
    large = ModelRunner(
        write_tiny_weights(tmp_path / "b", names=("lung",), size=96),
        model_names=["lung"],
        device="cpu",
        cache_dir=tmp_path / "c",
    )
    assert small.info("lung").sha256 == large.info("lung").sha256
    assert large.backend_name("lung") == "onnx-cpu"
    assert large.predict("lung", check_input(large.spec("lung"), batch=1)).mask.shape == (1, 1, 96, 96)


def test_micro_batcher_runs_waiting_callers_together() -> None:
    gate = threading.Event()
    sizes: list[int] = []

    def run(x: np.ndarray) -> Prediction:
        sizes.append(len(x))
        if len(sizes) == 1:
            gate.wait(30)  # hold the first pass until everyone else has queued
        return Prediction(mask=x * 2, presence=x[:, 0, 0, 0].copy())

    batcher = MicroBatcher(run, max_batch=4)
    results: dict[int, Prediction] = {}

    def call(i: int) -> None:
        results[i] = batcher(np.full((1, 1, 2, 2), i, np.float32))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(7)]
    threads[0].start()
    wait_for(lambda: sizes == [1], 10, "the first pass")
    for t in threads[1:]:
        t.start()
    wait_for(lambda: len(batcher._queue) == 6, 10, "six queued callers")
    gate.set()
    for t in threads:
        t.join(10)
    assert sizes == [1, 4, 2]  # FIFO, at most 4 images per pass
    for i in range(7):
        assert np.all(results[i].mask == 2 * i)
        assert results[i].presence is not None and results[i].presence.tolist() == [i]


def test_micro_batcher_failure_reaches_every_caller_of_the_pass() -> None:
    def run(x: np.ndarray) -> Prediction:
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        MicroBatcher(run, max_batch=4)(np.zeros((1, 1, 2, 2), np.float32))


class _ThreadRecorder:
    """A backend that answers with its input and notes which thread ran it."""

    name = "recorder"

    def __init__(self) -> None:
        self.threads: list[int] = []

    def __call__(self, x: np.ndarray) -> Prediction:
        self.threads.append(threading.get_ident())
        if not np.isfinite(x).all():
            raise ValueError("not a number in the input")
        return Prediction(mask=x)


def test_owner_thread_runs_every_callers_passes_on_one_thread() -> None:
    recorder = _ThreadRecorder()
    backend = OnThread(recorder, OwnerThread("test-owner"))
    results: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        results[i] = backend(np.full((1, 1, 2, 2), i, np.float32)).mask

    callers = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for c in callers:
        c.start()
    for c in callers:
        c.join()
    assert all(float(results[i].max()) == i for i in range(8))  # each caller gets its own answer
    assert len(set(recorder.threads)) == 1 and len(recorder.threads) == 8
    assert recorder.threads[0] not in {c.ident for c in callers} | {threading.get_ident()}
    assert backend.name == "recorder"
    # A failing pass raises in the caller's thread, and the owner thread goes on serving.
    with pytest.raises(ValueError, match="not a number"):
        backend(np.full((1, 1, 2, 2), np.nan, np.float32))
    assert backend(np.ones((1, 1, 2, 2), np.float32)).mask.sum() == 4


def test_concurrent_predicts_match_single_predicts(weights: Path, cache: Path) -> None:
    runner = ModelRunner(
        weights, model_names=["pneumothorax"], device="cpu", backend="torch", cache_dir=cache, micro_batch=4
    )
    x = check_input(runner.spec("pneumothorax"), batch=6)
    singles = [runner.predict("pneumothorax", x[i : i + 1]) for i in range(6)]
    out: dict[int, Prediction] = {}
    barrier = threading.Barrier(6)

    def call(i: int) -> None:
        barrier.wait()
        out[i] = runner.predict("pneumothorax", x[i : i + 1])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(6):
        assert max_abs_diff(out[i], singles[i]) < 1e-4  # each caller gets its own rows back
    assert runner.timings()["pneumothorax"].images == 12


def test_cpu_batch_size_groups_images_per_pass(weights: Path, cache: Path) -> None:
    runner = ModelRunner(weights, model_names=["lung"], device="cpu", cache_dir=cache, cpu_batch_size=3)
    pred = runner.predict("lung", check_input(runner.spec("lung"), batch=4))
    assert pred.mask.shape[0] == 4
    stats = runner.timings()["lung"]
    assert (stats.calls, stats.images) == (2, 4)  # passes of 3 + 1
