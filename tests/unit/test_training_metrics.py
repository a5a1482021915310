"""Metric functions against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.metrics import cohen_kappa, confusion_matrix, dice, hd95, iou, severity_agreement


def _box(shape, r0, r1, c0, c1):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def test_dice_and_iou_of_overlapping_boxes() -> None:
    a = _box((10, 10), 0, 4, 0, 4)  # 16 px
    b = _box((10, 10), 2, 6, 0, 4)  # 16 px, 8 shared
    assert dice(a, b) == pytest.approx(2 * 8 / 32)
    assert iou(a, b) == pytest.approx(8 / 24)


def test_empty_masks_agree_perfectly_and_one_empty_scores_zero() -> None:
    empty = np.zeros((5, 5), bool)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(_box((5, 5), 0, 2, 0, 2), empty) == 0.0


def test_ignored_pixels_do_not_count() -> None:
    truth = _box((10, 10), 0, 4, 0, 4)
    pred = truth | _box((10, 10), 8, 10, 8, 10)  # a false positive...
    valid = ~_box((10, 10), 8, 10, 8, 10)  # ...inside the ignore region
    assert dice(pred, truth) < 1.0
    assert dice(pred, truth, valid) == 1.0


def test_hd95_of_shifted_box_is_the_shift() -> None:
    a = _box((40, 40), 10, 20, 10, 20)
    b = _box((40, 40), 10, 20, 13, 23)  # shifted 3 columns
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(a, b, spacing=0.5) == pytest.approx(1.5)
    assert hd95(a, a) == 0.0


def test_hd95_undefined_when_one_mask_is_empty() -> None:
    empty = np.zeros((8, 8), bool)
    assert math.isnan(hd95(_box((8, 8), 1, 3, 1, 3), empty))
    assert hd95(empty, empty) == 0.0


def test_kappa_by_hand() -> None:
    # 2x2 table [[20, 5], [10, 15]]: po = 0.7, pe = (25*30 + 25*20)/50^2 = 0.5 -> kappa 0.4
    truth = [0] * 25 + [1] * 25
    pred = [0] * 20 + [1] * 5 + [0] * 10 + [1] * 15
    assert confusion_matrix(truth, pred, 2).tolist() == [[20, 5], [10, 15]]
    assert cohen_kappa(truth, pred, 2) == pytest.approx(0.4)
    assert cohen_kappa(truth, truth, 2) == 1.0


def test_weighted_kappa_penalises_far_errors_more() -> None:
    truth = [0, 1, 2, 3, 4, 5, 6] * 3
    near = [min(6, t + 1) for t in truth]
    far = [min(6, t + 3) for t in truth]
    assert cohen_kappa(truth, near, 7, "linear") > cohen_kappa(truth, far, 7, "linear")


def test_severity_agreement_against_fractional_reference() -> None:
    ref = [0.0, 2.5, 4.0, 6.0]  # 2.5 = raters 2 and 3
    pred = [0, 3, 5, 6]
    out = severity_agreement(ref, pred)
    assert out["mae"] == pytest.approx((0 + 0.5 + 1 + 0) / 4)
    assert out["exact"] == pytest.approx(3 / 4)  # 2.5 rounds half up to 3
    assert out["within_1"] == 1.0
    cm = np.asarray(out["confusion_matrix"])
    assert cm[3, 3] == 1 and cm[4, 5] == 1
