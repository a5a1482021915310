"""The covid_scoring zone algorithm: lung mask -> right/left lungs -> 3 zones each -> severity 0-6.

Conventions (PA/AP chest radiographs, displayed as acquired): the PATIENT's right lung appears on the
IMAGE's left half. Zones are split by cumulative row area, so each holds a third of its lung's pixels
(to within one row), which keeps the zones comparable when a lung is short or tilted.

Pure numpy/scipy: the training code imports this too, so the worker and `training evaluate` count
zones identically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

#: A zone counts when the opacity fraction inside it EXCEEDS this (tuned on validation folds).
DEFAULT_ZONE_THRESHOLD = 0.3
#: Components smaller than this fraction of the largest one are noise, not a lung.
MIN_COMPONENT_FRACTION = 0.05
#: A single component with at least this share of its pixels on each side of the midline is two
#: lungs touching (e.g. merged across the mediastinum), not one lung...
MERGED_MIN_SIDE_SHARE = 0.2
#: ...unless a second component of at least this fraction of it exists: that is the other lung, and
#: the first is one lung lying across the midline (a rotated or off-centre chest). On the lung
#: model's 1403 training images every such second component was 0.67-0.94 of the largest, and
#: cutting the largest instead dropped a whole lung.
MERGED_MAX_SECOND_FRACTION = 0.3


@dataclass(frozen=True)
class SeverityResult:
    score: int  # 0-6 affected zones
    zone_fractions: list[float]  # RU, RM, RL, LU, LM, LL: opacity fraction inside each zone
    zone_affected: list[bool]
    opacity_fraction: dict[str, float]  # {"right", "left"}: opacity fraction of each lung
    lung_area_px: dict[str, int]  # {"right", "left"}


def _as_bool_2d(mask: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D, got shape {arr.shape}")
    return arr.astype(bool, copy=False)


def _split_merged(blob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut one blob spanning both lungs at its narrowest column near the centre.

    The mediastinum is where the mask is thinnest, so the cut goes at the column of minimum mask
    height within the middle third of the blob's column extent (falling back to the image midline
    when that third is empty). Returns (image-left part, image-right part).
    """
    cols = np.flatnonzero(blob.any(axis=0))
    first, last = int(cols[0]), int(cols[-1])
    width = last - first + 1
    lo, hi = first + width // 3, first + (2 * width) // 3
    if hi <= lo:
        cut = blob.shape[1] // 2
    else:
        heights = blob[:, lo : hi + 1].sum(axis=0)
        # Among equal minima prefer the one closest to the blob's centre; the cut falls just before
        # the chosen column, so a symmetric blob splits into equal halves.
        candidates = np.flatnonzero(heights == heights.min()) + lo
        centre = (first + last + 1) / 2
        cut = int(candidates[np.argmin(np.abs(candidates - centre))])
    image_left = blob.copy()
    image_left[:, cut:] = False
    image_right = blob.copy()
    image_right[:, :cut] = False
    return image_left, image_right


def split_lungs(lung_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(right, left) lung masks of the PATIENT from a binary lung mask.

    Keeps the two largest connected components (specks under 5% of the largest are dropped). If the
    largest has a substantial share on both sides of the image midline and no other lung-sized
    component exists, it is two touching lungs and is cut at its narrowest central column. Otherwise, with two components the one whose centroid is
    further image-left is the patient's right lung; a single component is assigned by the image half
    of its centroid and the other lung is empty. An empty mask gives two empty masks.
    """
    mask = _as_bool_2d(lung_mask, "lung_mask")
    empty = np.zeros_like(mask)
    labels, n = ndimage.label(mask)
    if n == 0:
        return empty, empty.copy()
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1]
    keep = [int(i) + 1 for i in order[:2] if sizes[i] >= MIN_COMPONENT_FRACTION * sizes[order[0]]]
    components = [labels == lab for lab in keep]
    if n > len(keep):
        log.debug("split_lungs: dropped %d small component(s)", n - len(keep))

    mid = int(mask.shape[1] // 2)
    largest = components[0]
    area = int(largest.sum())
    left_share = int(largest[:, :mid].sum()) / area
    other_lung = len(components) > 1 and int(components[1].sum()) >= MERGED_MAX_SECOND_FRACTION * area
    if not other_lung and min(left_share, 1 - left_share) >= MERGED_MIN_SIDE_SHARE:
        # No single lung straddles the midline this much: both lungs touch. Other specks are noise.
        image_left, image_right = _split_merged(largest)
        return image_left, image_right
    if len(components) == 1:
        centroid_col = float(np.nonzero(largest)[1].mean())
        # Centroid on the image-left half -> it is the patient's right lung.
        return (largest, empty) if centroid_col < mid else (empty, largest)

    a, b = components
    col_a = float(np.nonzero(a)[1].mean())
    col_b = float(np.nonzero(b)[1].mean())
    return (a, b) if col_a <= col_b else (b, a)


def zone_masks(side_mask: np.ndarray) -> list[np.ndarray]:
    """[upper, middle, lower] zones of one lung, each about a third of its area.

    A row goes to the zone in which its middle pixel falls when the lung's pixels are counted top
    to bottom, so zone areas differ by less than one row's width. An empty lung gives empty zones.
    """
    mask = _as_bool_2d(side_mask, "side_mask")
    row_counts = mask.sum(axis=1).astype(np.float64)
    total = row_counts.sum()
    if total == 0:
        return [np.zeros_like(mask) for _ in range(3)]
    midpoints = np.cumsum(row_counts) - row_counts / 2
    row_zone = np.minimum((3 * midpoints / total).astype(int), 2)
    zones = []
    for z in range(3):
        zone = mask.copy()
        zone[row_zone != z] = False
        zones.append(zone)
    return zones


def _fraction(part: np.ndarray, whole: np.ndarray) -> float:
    n = int(whole.sum())
    return float((part & whole).sum()) / n if n else 0.0


def score(
    right: np.ndarray, left: np.ndarray, opacity: np.ndarray, threshold: float = DEFAULT_ZONE_THRESHOLD
) -> SeverityResult:
    """Severity 0-6: the number of the six lung zones whose opacity fraction exceeds `threshold`.

    Opacity outside the lungs is ignored. Zones of an empty lung have fraction 0 and never count.
    """
    r = _as_bool_2d(right, "right")
    lft = _as_bool_2d(left, "left")
    op = _as_bool_2d(opacity, "opacity")
    if not (r.shape == lft.shape == op.shape):
        raise ValueError(f"mask shapes differ: right {r.shape}, left {lft.shape}, opacity {op.shape}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    fractions = [_fraction(op, zone) for side in (r, lft) for zone in zone_masks(side)]
    affected = [f > threshold for f in fractions]
    return SeverityResult(
        score=int(sum(affected)),
        zone_fractions=fractions,
        zone_affected=affected,
        opacity_fraction={"right": _fraction(op, r), "left": _fraction(op, lft)},
        lung_area_px={"right": int(r.sum()), "left": int(lft.sum())},
    )
