"""Test-time augmentation: transforms undo exactly, the mean ignores pixels a copy never saw, the card opts in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support.tiny_models import TINY_SIZE, write_tiny_weights
from workers import models, tta
from workers.backends import Prediction, check_input
from workers.runner import ModelRunner


def pixelwise(x: np.ndarray) -> Prediction:
    """A 'network' that commutes with every geometric transform: sigmoid of each pixel."""
    return Prediction(mask=(1 / (1 + np.exp(-x))).astype(np.float32), presence=x.mean(axis=(1, 2, 3)))


def smooth_batch(side: int = 32) -> np.ndarray:
    r, c = np.mgrid[0:side, 0:side] / side
    return np.stack([np.sin(3 * r + 2 * c), np.cos(2 * r - c)])[:, None].astype(np.float32)


@pytest.mark.parametrize(
    "names, message",
    [
        (["gamma:0.8"], "must start with 'identity'"),
        ([], "must start with 'identity'"),
        (["identity", "flip"], "not understood"),
        (["identity", "gamma:x"], "must be numbers"),
        (["identity", "gamma:9"], "not understood"),
        (["identity", "shift:0.5:0"], "not understood"),
        (["identity", "scale:1.1", "scale:1.1"], "repeated"),
    ],
)
def test_bad_transform_lists_are_refused(names: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tta.parse(names)


def test_names_round_trip() -> None:
    names = ["identity", "gamma:0.8", "scale:1.1", "shift:0.03:-0.05"]
    assert [t.name for t in tta.parse(names)] == names


def test_identity_alone_is_one_plain_forward_pass() -> None:
    x = smooth_batch()
    calls: list[np.ndarray] = []

    def forward(b: np.ndarray) -> Prediction:
        calls.append(b)
        return pixelwise(b)

    out = tta.predict(forward, x, tta.parse(["identity"]))
    assert len(calls) == 1 and calls[0] is x
    np.testing.assert_array_equal(out.mask, pixelwise(x).mask)


def test_gamma_changes_the_exposure_as_preprocess_defines_it() -> None:
    # preprocess: x = (p - 0.5) / 0.25 for pixel p in 0..1; p = 0.25 -> x = -1; gamma 2: p = 0.0625
    x = np.full((1, 1, 4, 4), -1.0, np.float32)
    (g,) = tta.parse(["identity", "gamma:2"])[1:]
    np.testing.assert_allclose(tta.forward_image(x, g), (0.0625 - 0.5) / 0.25)


def test_shift_moves_content_and_back_exactly() -> None:
    x = np.zeros((1, 1, 10, 10), np.float32)
    x[0, 0, 2, 3] = 5.0
    (t,) = tta.parse(["identity", "shift:0.2:-0.1"])[1:]  # 2 rows down, 1 column left
    moved = tta.forward_image(x, t)
    assert moved[0, 0, 4, 2] == 5.0 and moved.sum() == 5.0
    back, weight = tta.inverse_mask(moved, t)
    assert back[0, 0, 2, 3] == 5.0
    # the two bottom rows and the left column were pushed out of the copy: it never saw them
    assert weight[8:].sum() == 0 and weight[:, 0].sum() == 0 and weight[:8, 1:].all()


@pytest.mark.parametrize("name", ["shift:0.1:0.05", "shift:-0.1:0", "gamma:1.3"])
def test_an_equivariant_network_is_unchanged_by_exact_transforms(name: str) -> None:
    x = smooth_batch()
    plain = pixelwise(x).mask
    if name.startswith("gamma"):  # intensity: the copy sees other values, the mean moves
        out = tta.predict(pixelwise, x, tta.parse(["identity", name]))
        assert not np.allclose(out.mask, plain)
        return
    out = tta.predict(pixelwise, x, tta.parse(["identity", name]))
    np.testing.assert_allclose(out.mask, plain, atol=1e-6)


@pytest.mark.parametrize("name", ["scale:1.15", "scale:0.85"])
def test_scale_copies_map_back_onto_the_input_grid(name: str) -> None:
    x = smooth_batch(64)
    plain = pixelwise(x).mask
    out = tta.predict(pixelwise, x, tta.parse(["identity", name]))
    inner = slice(8, 56)  # resampling twice blurs a little, the edges most
    assert np.abs(out.mask[..., inner, inner] - plain[..., inner, inner]).max() < 0.02


def test_zoomed_in_copy_leaves_the_border_to_the_others() -> None:
    x = np.zeros((1, 1, 20, 20), np.float32)
    (t,) = tta.parse(["identity", "scale:2"])[1:]
    _, weight = tta.inverse_mask(np.ones((1, 1, 20, 20), np.float32), t)
    assert weight[5:15, 5:15].all() and weight.sum() == 100

    def constant_per_copy(b: np.ndarray) -> Prediction:
        value = 0.2 if b is x else 0.8  # identity sees 0.2 everywhere, the zoomed copy 0.8
        return Prediction(mask=np.full_like(b, value))

    out = tta.predict(constant_per_copy, x, [tta.Transform("identity"), t]).mask[0, 0]
    assert out[0, 0] == pytest.approx(0.2) and out[10, 10] == pytest.approx(0.5)


def test_presence_is_the_mean_over_copies() -> None:
    x = smooth_batch()
    transforms = tta.parse(["identity", "gamma:0.5", "gamma:2"])
    copies = [pixelwise(tta.forward_image(x, t)).presence for t in transforms]
    expected = np.mean([p for p in copies if p is not None], axis=0)
    out = tta.predict(pixelwise, x, transforms)
    assert out.presence is not None
    np.testing.assert_allclose(out.presence, expected, rtol=1e-6)


def test_runner_runs_the_cards_transforms(tmp_path: Path) -> None:
    plain_dir = write_tiny_weights(tmp_path / "plain", names=("lung",))
    tta_dir = write_tiny_weights(
        tmp_path / "tta", names=("lung",), cards={"lung": {"tta": ["identity", "gamma:0.8", "shift:0.05:0"]}}
    )
    plain = ModelRunner(plain_dir, model_names=["lung"], device="cpu", backend="torch", threads=1)
    with_tta = ModelRunner(tta_dir, model_names=["lung"], device="cpu", backend="torch", threads=1)
    x = check_input(plain.spec("lung"), batch=2)
    a, b = plain.predict("lung", x), with_tta.predict("lung", x)
    assert b.mask.shape == a.mask.shape == (2, 1, TINY_SIZE, TINY_SIZE)
    assert plain.timings()["lung"].images == 2
    assert with_tta.timings()["lung"].images == 6  # three copies of each image
    assert with_tta.info("lung").architecture == plain.info("lung").architecture + "+tta(gamma:0.8 shift:0.05:0)"
    transforms = tta.parse(["identity", "gamma:0.8", "shift:0.05:0"])
    expected = tta.predict(plain.models["lung"].backend, x, transforms)  # same weights (same seed)
    np.testing.assert_allclose(b.mask, expected.mask, atol=1e-6)


def test_a_card_with_a_bad_tta_list_is_refused_at_load(tmp_path: Path) -> None:
    write_tiny_weights(tmp_path, names=("lung",), cards={"lung": {"tta": ["gamma:0.8"]}})
    with pytest.raises(models.WeightsError, match="card `tta`"):
        ModelRunner(tmp_path, model_names=["lung"], device="cpu", backend="torch", threads=1)
