"""The zone algorithm on synthetic masks whose answers are known by construction."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from workers.severity import score, split_lungs, zone_masks

H, W = 120, 100


def two_lungs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mask, image-left rectangle, image-right rectangle) with different sizes so they are tellable."""
    image_left = np.zeros((H, W), bool)
    image_left[10:100, 10:40] = True
    image_right = np.zeros((H, W), bool)
    image_right[20:100, 60:85] = True
    return image_left | image_right, image_left, image_right


def test_patient_right_lung_is_on_image_left() -> None:
    mask, image_left, image_right = two_lungs()
    right, left = split_lungs(mask)
    assert np.array_equal(right, image_left)
    assert np.array_equal(left, image_right)


@pytest.mark.parametrize("angle", [-25, -10, 10, 25])
def test_rotated_lungs_keep_their_sides(angle: float) -> None:
    _, image_left, image_right = two_lungs()
    rot_l = ndimage.rotate(image_left.astype(np.uint8), angle, reshape=False, order=0).astype(bool)
    rot_r = ndimage.rotate(image_right.astype(np.uint8), angle, reshape=False, order=0).astype(bool)
    assert not (ndimage.binary_dilation(rot_l) & rot_r).any(), "test lungs must stay separate"
    right, left = split_lungs(rot_l | rot_r)
    assert np.array_equal(right, rot_l)
    assert np.array_equal(left, rot_r)


@pytest.mark.parametrize("which", ["image_left", "image_right"])
def test_one_lung_is_assigned_by_its_image_half(which: str) -> None:
    _, image_left, image_right = two_lungs()
    only = image_left if which == "image_left" else image_right
    right, left = split_lungs(only)
    if which == "image_left":
        assert np.array_equal(right, only) and not left.any()
    else:
        assert np.array_equal(left, only) and not right.any()


def test_merged_blob_is_cut_at_the_narrow_bridge() -> None:
    _, image_left, image_right = two_lungs()
    bridge = np.zeros((H, W), bool)
    bridge[50:54, 40:60] = True  # lungs touching over the mediastinum: 4 rows tall, thinnest here
    right, left = split_lungs(image_left | image_right | bridge)
    assert not (right & left).any()
    assert np.array_equal(right | left, image_left | image_right | bridge)
    # The cut lies on the bridge, so each side keeps its whole rectangle and only bridge pixels.
    assert np.array_equal(right & ~bridge, image_left)
    assert np.array_equal(left & ~bridge, image_right)
    cut_cols = np.flatnonzero(left.any(axis=0))
    assert 40 < cut_cols[0] < 60


def test_a_lung_lying_across_the_midline_is_not_cut_when_the_other_lung_is_there() -> None:
    """A rotated chest: the patient's right lung reaches well past the midline (a third of it on the
    image-right half), the left lung is its own component. Two lungs, not two touching lungs."""
    image_left = np.zeros((H, W), bool)
    image_left[10:100, 30:60] = True  # 20 of its 30 columns left of the midline (50)
    image_right = np.zeros((H, W), bool)
    image_right[20:100, 70:95] = True
    right, left = split_lungs(image_left | image_right)
    assert np.array_equal(right, image_left) and np.array_equal(left, image_right)
    # The same lung alone, with only a speck beside it, is still taken for two touching lungs.
    speck = np.zeros((H, W), bool)
    speck[5:8, 90:93] = True
    right, left = split_lungs(image_left | speck)
    assert right.any() and left.any() and np.array_equal(right | left, image_left)


def test_specks_are_dropped_and_empty_mask_gives_empty_lungs() -> None:
    mask, image_left, image_right = two_lungs()
    mask[2:4, 2:4] = True  # 4 px speck, far below 5% of a lung
    right, left = split_lungs(mask)
    assert np.array_equal(right, image_left) and np.array_equal(left, image_right)

    right, left = split_lungs(np.zeros((H, W), bool))
    assert right.shape == (H, W) and not right.any() and not left.any()


def test_zones_of_a_rectangle_are_exact_thirds() -> None:
    lung = np.zeros((H, W), bool)
    lung[10:100, 10:40] = True  # 90 rows -> 30 rows per zone
    upper, middle, lower = zone_masks(lung)
    assert np.array_equal(np.flatnonzero(upper.any(axis=1)), np.arange(10, 40))
    assert np.array_equal(np.flatnonzero(middle.any(axis=1)), np.arange(40, 70))
    assert np.array_equal(np.flatnonzero(lower.any(axis=1)), np.arange(70, 100))
    assert np.array_equal(upper | middle | lower, lung)


def test_zones_of_a_triangle_have_equal_area_not_equal_height() -> None:
    rows = np.arange(H)[:, None]
    cols = np.arange(W)[None, :]
    lung = (rows >= 10) & (rows < 110) & (cols < 10 + (rows - 10) * 0.8)  # widens downwards
    zones = zone_masks(lung)
    areas = [int(z.sum()) for z in zones]
    assert sum(areas) == int(lung.sum())
    widest_row = int(lung.sum(axis=1).max())
    assert max(areas) - min(areas) <= widest_row
    heights = [int(z.any(axis=1).sum()) for z in zones]
    assert heights[0] > heights[1] > heights[2]  # the narrow apex needs more rows for a third
    assert not any((zones[i] & zones[j]).any() for i in range(3) for j in range(i + 1, 3))


def test_empty_lung_has_empty_zones() -> None:
    assert all(not z.any() for z in zone_masks(np.zeros((H, W), bool)))


def test_score_counts_zones_above_threshold() -> None:
    mask, _image_left, _image_right = two_lungs()
    right, left = split_lungs(mask)
    opacity = np.zeros((H, W), bool)
    opacity[70:100, 10:40] = True  # the whole right lower zone
    opacity[20:47, 60:70] = True  # 10 of 25 columns of the left upper zone: fraction 0.4
    opacity[0:5, :] = True  # outside both lungs: ignored
    res = score(right, left, opacity)
    assert res.score == 2
    assert res.zone_affected == [False, False, True, True, False, False]
    assert res.zone_fractions == pytest.approx([0.0, 0.0, 1.0, 0.4, 0.0, 0.0])
    assert res.lung_area_px == {"right": 90 * 30, "left": 80 * 25}
    assert res.opacity_fraction["right"] == pytest.approx(1 / 3)
    assert res.opacity_fraction["left"] == pytest.approx(27 * 10 / (80 * 25))
    # A zone must EXCEED the threshold; 0.4 is not above 0.4.
    assert score(right, left, opacity, threshold=0.4).score == 1


def test_score_of_full_and_empty_opacity() -> None:
    mask, _, _ = two_lungs()
    right, left = split_lungs(mask)
    assert score(right, left, mask).score == 6
    assert score(right, left, np.zeros_like(mask)).score == 0
    empty = np.zeros_like(mask)
    res = score(empty, empty, mask)
    assert res.score == 0 and res.zone_fractions == [0.0] * 6 and res.lung_area_px == {"right": 0, "left": 0}


def test_score_rejects_bad_input() -> None:
    mask, _, _ = two_lungs()
    with pytest.raises(ValueError, match="shapes differ"):
        score(mask, mask, mask[:10])
    with pytest.raises(ValueError, match="threshold"):
        score(mask, mask, mask, threshold=1.5)
    with pytest.raises(ValueError, match="2-D"):
        split_lungs(mask[None])


def test_symmetric_blob_splits_into_equal_halves() -> None:
    blob = np.zeros((H, W), bool)
    blob[10:100, 10:90] = True  # no waist at all: the cut goes through the centre
    right, left = split_lungs(blob)
    assert int(right.sum()) == int(left.sum()) == 90 * 40
    assert right[10:100, 10:50].all() and left[10:100, 50:90].all()
