"""Segmentation and agreement metrics, computed on boolean masks at the image's own grid."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy import ndimage


def dice(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> float:
    """2|P∩T| / (|P|+|T|); 1.0 when both are empty (a correct negative)."""
    p, t = _masked(pred, valid), _masked(truth, valid)
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


def iou(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> float:
    p, t = _masked(pred, valid), _masked(truth, valid)
    union = int((p | t).sum())
    return 1.0 if union == 0 else int((p & t).sum()) / union


def _masked(mask: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    m = np.asarray(mask, dtype=bool)
    return m if valid is None else m & np.asarray(valid, dtype=bool)


def _surface(mask: np.ndarray) -> np.ndarray:
    eroded = np.asarray(ndimage.binary_erosion(mask, border_value=0), dtype=bool)
    surface: np.ndarray = mask & ~eroded
    return surface


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: float = 1.0) -> float:
    """95th percentile of the symmetric surface distances (pixels x spacing).

    0 when both masks are empty; NaN when exactly one is (the distance is undefined).
    """
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return math.nan
    sp, st = _surface(p), _surface(t)
    dist_to_t = ndimage.distance_transform_edt(~st)
    dist_to_p = ndimage.distance_transform_edt(~sp)
    d = np.concatenate([dist_to_t[sp], dist_to_p[st]])
    return float(np.percentile(d, 95)) * spacing


def confusion_matrix(truth: npt.ArrayLike, pred: npt.ArrayLike, n: int) -> np.ndarray:
    cm = np.zeros((n, n), dtype=int)
    for t, p in zip(np.asarray(truth).ravel(), np.asarray(pred).ravel(), strict=True):
        cm[int(t), int(p)] += 1
    return cm


def cohen_kappa(truth: npt.ArrayLike, pred: npt.ArrayLike, n: int, weights: str | None = None) -> float:
    """Cohen's kappa; weights None (unweighted), "linear" or "quadratic"."""
    cm = confusion_matrix(truth, pred, n).astype(float)
    total = cm.sum()
    if total == 0:
        return math.nan
    i, j = np.indices((n, n))
    if weights is None:
        w = (i != j).astype(float)
    elif weights == "linear":
        w = np.abs(i - j).astype(float)
    elif weights == "quadratic":
        w = ((i - j) ** 2).astype(float)
    else:
        raise ValueError(f"unknown weights {weights!r}")
    expected = np.outer(cm.sum(1), cm.sum(0)) / total
    denom = (w * expected).sum()
    return 1.0 if denom == 0 else float(1 - (w * cm).sum() / denom)


def severity_agreement(truth: Sequence[float], pred: Sequence[int], n: int = 7) -> dict[str, object]:
    """MAE vs a (possibly fractional) reference, exact and ±1 accuracy, confusion matrix, kappa.

    Accuracy, confusion matrix and kappa use the reference rounded half up (2.5 -> 3).
    """
    t = np.asarray(truth, float)
    p = np.asarray(pred, int)
    rounded = np.floor(t + 0.5).astype(int)
    return {
        "n": len(t),
        "mae": float(np.mean(np.abs(p - t))) if len(t) else math.nan,
        "exact": float(np.mean(p == rounded)) if len(t) else math.nan,
        "within_1": float(np.mean(np.abs(p - t) <= 1.0)) if len(t) else math.nan,
        "kappa": cohen_kappa(rounded, p, n),
        "kappa_linear": cohen_kappa(rounded, p, n, "linear"),
        "confusion_matrix": confusion_matrix(rounded, p, n).tolist(),
    }
