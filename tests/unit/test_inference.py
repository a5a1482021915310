"""workers.inference end to end on tiny models: constant heads give answers known exactly."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from tests.support.tiny_models import write_tiny_weights
from workers.api import MASK_NAMES, AnalyzeRequest, AnalyzeResult
from workers.inference import analyze, analyze_batch, lung_box, pneumothorax_side
from workers.runner import ModelRunner

ROWS, COLS = 90, 120  # not square and not the model size: masks must come back on this grid


def image(seed: int = 0, rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, cols, dtype=np.float32)[None, :] + np.zeros((rows, 1), np.float32)
    return np.clip(ramp + rng.normal(0, 20, (rows, cols)), 0, 255).astype(np.uint8)


def runner_for(tmp: Path, **kwargs: object) -> ModelRunner:
    write_tiny_weights(tmp / "w", **kwargs)  # type: ignore[arg-type]
    return ModelRunner(tmp / "w", device="cpu", cache_dir=tmp / "onnx", threads=1)


@pytest.fixture(scope="module")
def all_on(tmp_path_factory: pytest.TempPathFactory) -> ModelRunner:
    """Lungs everywhere, opacity everywhere, pneumothorax present everywhere."""
    return runner_for(
        tmp_path_factory.mktemp("on"),
        head_logits={"lung": (8.0, None), "opacity": (8.0, None), "pneumothorax": (8.0, 8.0)},
    )


@pytest.fixture(scope="module")
def random_models(tmp_path_factory: pytest.TempPathFactory) -> ModelRunner:
    return runner_for(tmp_path_factory.mktemp("random"), cards={"opacity": {"input_region": "lung_crop"}})


def test_full_lungs_full_opacity_score_six(all_on: ModelRunner) -> None:
    res = analyze(AnalyzeRequest.build("job-1", image()), all_on)
    # One blob over the whole image is cut at the midline; patient right = image left.
    right, left = res.mask("right_lung"), res.mask("left_lung")
    assert right is not None and left is not None and right.shape == (ROWS, COLS)
    assert right[:, : COLS // 2].all() and not right[:, COLS // 2 :].any()
    assert np.array_equal(left, ~right)
    assert res.lung_area_px == {"right": ROWS * COLS // 2, "left": ROWS * COLS // 2}
    assert res.severity_score == 6 and res.zone_affected == [True] * 6
    assert res.zone_fractions == [1.0] * 6 and res.opacity_fraction == {"right": 1.0, "left": 1.0}
    assert res.pneumothorax_present is True and res.pneumothorax_side == "both"
    assert res.pneumothorax_area_px == ROWS * COLS and res.pneumothorax_probability == pytest.approx(1.0, abs=1e-3)
    assert set(res.masks) == set(MASK_NAMES)
    assert [m.name for m in res.models] == ["lung", "opacity", "pneumothorax"]
    assert {"lung", "opacity", "pneumothorax", "total"} <= set(res.timings_ms)
    assert res.warnings == []
    started = res.started()  # the results' Content Date/Time
    assert started is not None and abs((datetime.now(UTC) - started).total_seconds()) < 600
    # The message survives JSON-shaped transport unchanged.
    assert AnalyzeResult.from_message(res.to_message()) == res


def test_nothing_found(tmp_path: Path) -> None:
    runner = runner_for(
        tmp_path, head_logits={"lung": (-8.0, None), "opacity": (-8.0, None), "pneumothorax": (8.0, -8.0)}
    )
    res = analyze(AnalyzeRequest.build("job-2", image()), runner)
    assert res.lung_area_px == {"right": 0, "left": 0}
    assert any("implausibly small" in w for w in res.warnings)
    assert res.severity_score == 0 and res.zone_fractions == [0.0] * 6
    # The aux head says absent, so the (all-positive) pixel mask is cleared: SEG and SR agree.
    assert res.pneumothorax_present is False and res.pneumothorax_area_px == 0
    assert res.pneumothorax_side is None and res.pneumothorax_probability == pytest.approx(0.0, abs=1e-3)
    ptx = res.mask("pneumothorax")
    assert ptx is not None and not ptx.any()


def test_only_requested_models_run(all_on: ModelRunner) -> None:
    res = analyze(AnalyzeRequest.build("job-3", image(), models=("lung",)), all_on)
    assert set(res.masks) == {"right_lung", "left_lung"}
    assert res.severity_score is None and res.pneumothorax_present is None
    assert [m.name for m in res.models] == ["lung"]


def test_opacity_brings_the_lungs_along(all_on: ModelRunner) -> None:
    res = analyze(AnalyzeRequest.build("job-4", image(), models=("opacity",)), all_on)
    assert res.severity_score == 6 and "right_lung" in res.masks


def test_model_missing_on_this_worker_is_a_warning(tmp_path: Path) -> None:
    write_tiny_weights(tmp_path / "w", names=("lung",))
    runner = ModelRunner(tmp_path / "w", model_names=["lung"], device="cpu", cache_dir=tmp_path / "onnx")
    res = analyze(AnalyzeRequest.build("job-5", image()), runner)
    assert set(res.masks) == {"right_lung", "left_lung"}
    assert res.warnings[:2] == [
        "opacity model is not loaded on this worker; skipped",
        "pneumothorax model is not loaded on this worker; skipped",
    ]


def test_pixel_threshold_comes_from_the_card(tmp_path: Path) -> None:
    # Opacity probability is sigmoid(0.4) = 0.599 everywhere: opaque at the default threshold 0.5,
    # clear at the card's 0.65.
    heads = {"lung": (8.0, None), "opacity": (0.4, None)}
    default = runner_for(tmp_path / "a", head_logits=heads)
    carded = runner_for(tmp_path / "b", head_logits=heads, cards={"opacity": {"threshold": 0.65}})
    req = AnalyzeRequest.build("job-6", image(), models=("lung", "opacity"))
    assert analyze(req, default).severity_score == 6
    assert analyze(req, carded).severity_score == 0


def test_zone_threshold_override_travels_in_the_request() -> None:
    req = AnalyzeRequest.build("job-7", image(), zone_threshold=0.25)
    assert AnalyzeRequest.from_message(req.to_message()).zone_threshold == 0.25
    assert AnalyzeRequest.from_message(AnalyzeRequest.build("j", image()).to_message()).zone_threshold is None


def test_batch_equals_one_by_one(random_models: ModelRunner) -> None:
    requests = [
        AnalyzeRequest.build(f"b{i}", image(i, rows=r, cols=c))
        for i, (r, c) in enumerate([(90, 120), (128, 100), (64, 64)])
    ]
    batch = analyze_batch(requests, random_models)
    assert [r.job_id for r in batch] == ["b0", "b1", "b2"]
    for req, res in zip(requests, batch, strict=True):
        single = analyze(req, random_models)
        assert single.masks == res.masks and single.severity_score == res.severity_score
        for name in MASK_NAMES:
            m = res.mask(name)
            assert m is not None and m.shape == (req.rows, req.cols)
        right, left, opacity = res.mask("right_lung"), res.mask("left_lung"), res.mask("opacity")
        assert right is not None and left is not None and opacity is not None
        assert not (right & left).any()
        assert not (opacity & ~(right | left)).any()  # opacity only inside the lungs
        assert res.severity_score is not None and 0 <= res.severity_score <= 6


def test_lung_box_and_pneumothorax_side() -> None:
    lungs = np.zeros((100, 100), bool)
    lungs[20:80, 10:40] = True
    lungs[20:80, 60:90] = True
    assert lung_box(lungs, margin=0.0) == (20, 80, 10, 90)
    assert lung_box(lungs, margin=0.1) == (14, 86, 2, 98)
    assert lung_box(np.zeros((5, 5), bool)) is None

    right, left = lungs.copy(), lungs.copy()
    right[:, 50:] = False
    left[:, :50] = False
    ptx = np.zeros_like(lungs)
    ptx[20:30, 5:20] = True  # apex of the image-left lung = patient's right
    assert pneumothorax_side(ptx, right, left) == "right"
    assert pneumothorax_side(np.fliplr(ptx), right, left) == "left"
    assert pneumothorax_side(ptx | np.fliplr(ptx), right, left) == "both"
    assert pneumothorax_side(np.zeros_like(ptx), right, left) is None
    assert pneumothorax_side(ptx, None, None) == "right"  # no lungs: image midline
