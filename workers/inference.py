"""One chest radiograph in, masks and numbers out: lungs -> opacity -> severity; pneumothorax.

Every mask comes back on the request's pixel grid. Probability maps are resized back before they are
thresholded, so the mask edges are as smooth as the grid allows. Thresholds and options come from
each model's card, so a retrained model ships its own operating point:

- every card: `threshold` (pixel probability, default 0.5), `status`, `version`; optional `tta`
  (test-time augmentation, applied by the runner: `workers.tta`).
- lung: `spec.classes == 1` -> one lung mask split by `workers.severity.split_lungs`; `classes == 2`
  -> channels [patient right, patient left] (or the names in `channels`).
- opacity: `input_region` "image" (default) or "lung_crop" (the network sees the lungs' bounding
  box); `zone_threshold` (default 0.3) for the severity count.
- pneumothorax: `presence_threshold` (default 0.5) on the aux head's probability when the model has
  one, else on the maximum pixel probability; optional `min_area_fraction` of the image below which
  a mask counts as absent. An absent finding clears the mask, so SEG and SR agree.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
from PIL import Image

from workers import severity
from workers.api import AnalyzeRequest, AnalyzeResult, ModelInfo, pack_mask
from workers.models import preprocess
from workers.runner import ModelRunner

log = logging.getLogger(__name__)

#: Lungs covering less than this fraction of the image are suspicious (wrong view, failed model).
MIN_LUNG_FRACTION = 0.05
#: Margin around the lungs' bounding box for the opacity crop, as a fraction of the box side.
CROP_MARGIN = 0.05
#: A side counts for the pneumothorax when it holds at least this share of the mask.
SIDE_MIN_SHARE = 0.1


@dataclass
class _Case:
    """Per-image working state while a batch passes through the models."""

    request: AnalyzeRequest
    image: np.ndarray
    result: AnalyzeResult
    right: np.ndarray | None = None
    left: np.ndarray | None = None
    infos: dict[str, ModelInfo] = field(default_factory=dict)


def resize_prob(prob: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Bilinear resize of a float probability map to rows x cols."""
    if prob.shape == (rows, cols):
        return prob.astype(np.float32, copy=False)
    im = Image.fromarray(np.ascontiguousarray(prob, dtype=np.float32))
    return np.asarray(im.resize((cols, rows), Image.Resampling.BILINEAR), dtype=np.float32)


def lung_box(lungs: np.ndarray, margin: float = CROP_MARGIN) -> tuple[int, int, int, int] | None:
    """(r0, r1, c0, c1) half-open bounding box of the lungs with a margin, or None if empty."""
    rows = np.flatnonzero(lungs.any(axis=1))
    cols = np.flatnonzero(lungs.any(axis=0))
    if rows.size == 0:
        return None
    h, w = lungs.shape
    dr = round((rows[-1] - rows[0] + 1) * margin)
    dc = round((cols[-1] - cols[0] + 1) * margin)
    return (max(0, rows[0] - dr), min(h, rows[-1] + 1 + dr), max(0, cols[0] - dc), min(w, cols[-1] + 1 + dc))


def _models_to_run(request: AnalyzeRequest, runner: ModelRunner, warnings: list[str]) -> list[str]:
    wanted = list(request.models)
    # Opacity is read inside the lungs and the pneumothorax side needs them: lungs come along.
    if ("opacity" in wanted or "pneumothorax" in wanted) and "lung" not in wanted:
        wanted.insert(0, "lung")
    run = []
    for name in wanted:
        if runner.has(name):
            run.append(name)
        else:
            warnings.append(f"{name} model is not loaded on this worker; skipped")
    return run


def analyze(request: AnalyzeRequest, runner: ModelRunner) -> AnalyzeResult:
    """Run the requested models on one prepared image."""
    return analyze_batch([request], runner)[0]


def analyze_batch(requests: Sequence[AnalyzeRequest], runner: ModelRunner) -> list[AnalyzeResult]:
    """Run a batch: each model sees all images of the batch together (micro-batched on a GPU)."""
    t_start = time.perf_counter()
    started_at = datetime.now(UTC).isoformat()  # the results' Content Date/Time
    cases = []
    for req in requests:
        image = req.pixels()
        cases.append(
            _Case(
                request=req,
                image=image,
                result=AnalyzeResult(job_id=req.job_id, rows=req.rows, cols=req.cols, started_at=started_at),
            )
        )
    plans = [_models_to_run(c.request, runner, c.result.warnings) for c in cases]
    for name, step in (("lung", _run_lung), ("opacity", _run_opacity), ("pneumothorax", _run_pneumothorax)):
        members = [c for c, plan in zip(cases, plans, strict=True) if name in plan]
        if not members:
            continue
        t0 = time.perf_counter()
        step(members, runner)
        per_image = (time.perf_counter() - t0) * 1000 / len(members)
        for c in members:
            c.result.timings_ms[name] = round(per_image, 2)
            c.result.models.append(runner.info(name))
    total = (time.perf_counter() - t_start) * 1000 / max(1, len(cases))
    for c in cases:
        c.result.timings_ms["total"] = round(total, 2)
        for w in c.result.warnings:
            log.warning("job %s: %s", c.request.job_id, w)
    return [c.result for c in cases]


def _predict_full(name: str, cases: Sequence[_Case], runner: ModelRunner) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Probability maps (channels, rows, cols) on each case's grid, and presence probabilities."""
    size = runner.spec(name).input_size
    pred = runner.predict(name, np.concatenate([preprocess(c.image, size) for c in cases]))
    maps = [
        np.stack([resize_prob(ch, c.request.rows, c.request.cols) for ch in pred.mask[i]]) for i, c in enumerate(cases)
    ]
    return maps, pred.presence


def _run_lung(cases: Sequence[_Case], runner: ModelRunner) -> None:
    card = runner.card("lung")
    thr = float(card.get("threshold", 0.5))
    maps, _ = _predict_full("lung", cases, runner)
    for c, prob in zip(cases, maps, strict=True):
        if prob.shape[0] == 1:
            right, left = severity.split_lungs(prob[0] > thr)
        else:
            channels = list(card.get("channels", ["right_lung", "left_lung"]))
            pr, pl = prob[channels.index("right_lung")], prob[channels.index("left_lung")]
            right, left = (pr > thr) & (pr >= pl), (pl > thr) & (pl > pr)
        c.right, c.left = right, left
        c.result.masks["right_lung"] = pack_mask(right)
        c.result.masks["left_lung"] = pack_mask(left)
        c.result.lung_area_px = {"right": int(right.sum()), "left": int(left.sum())}
        fraction = (c.result.lung_area_px["right"] + c.result.lung_area_px["left"]) / right.size
        if fraction < MIN_LUNG_FRACTION:
            c.result.warnings.append(f"lung mask implausibly small ({fraction:.1%} of the image)")
        elif not right.any() or not left.any():
            missing = "right" if not right.any() else "left"
            c.result.warnings.append(f"only one lung found ({missing} lung missing)")


def _run_opacity(cases: Sequence[_Case], runner: ModelRunner) -> None:
    card = runner.card("opacity")
    thr = float(card.get("threshold", 0.5))
    zone_thr = float(card.get("zone_threshold", severity.DEFAULT_ZONE_THRESHOLD))
    crop = "lung_crop" in (card.get("input_region"), card.get("region"), card.get("preprocessing"))
    if not crop:
        maps, _ = _predict_full("opacity", cases, runner)
        probs = [m[0] for m in maps]
    else:
        probs = _predict_lung_crop(cases, runner)
    for c, prob in zip(cases, probs, strict=True):
        opacity = prob > thr
        if c.right is None or c.left is None:  # lung model absent on this worker: no severity
            c.result.masks["opacity"] = pack_mask(opacity)
            continue
        lungs = c.right | c.left
        opacity &= lungs
        c.result.masks["opacity"] = pack_mask(opacity)
        threshold = c.request.zone_threshold if c.request.zone_threshold is not None else zone_thr
        res = severity.score(c.right, c.left, opacity, threshold=threshold)
        c.result.severity_score = res.score
        c.result.zone_fractions = [round(f, 4) for f in res.zone_fractions]
        c.result.zone_affected = res.zone_affected
        c.result.opacity_fraction = {k: round(v, 4) for k, v in res.opacity_fraction.items()}
        c.result.lung_area_px = res.lung_area_px


def _predict_lung_crop(cases: Sequence[_Case], runner: ModelRunner) -> list[np.ndarray]:
    """Opacity probabilities from the lungs' bounding-box crop, pasted back onto the full grid."""
    size = runner.spec("opacity").input_size
    boxes = []
    for c in cases:
        box = lung_box(c.right | c.left) if c.right is not None and c.left is not None else None
        if box is None:
            c.result.warnings.append("no lungs to crop for the opacity model; used the whole image")
            box = (0, c.request.rows, 0, c.request.cols)
        boxes.append(box)
    batch = np.concatenate(
        [
            preprocess(np.ascontiguousarray(c.image[r0:r1, c0:c1]), size)
            for c, (r0, r1, c0, c1) in zip(cases, boxes, strict=True)
        ]
    )
    pred = runner.predict("opacity", batch)
    probs = []
    for i, (c, (r0, r1, c0, c1)) in enumerate(zip(cases, boxes, strict=True)):
        full = np.zeros((c.request.rows, c.request.cols), np.float32)
        full[r0:r1, c0:c1] = resize_prob(pred.mask[i, 0], r1 - r0, c1 - c0)
        probs.append(full)
    return probs


def _centroid_col(mask: np.ndarray) -> float:
    per_col = mask.sum(axis=0)
    return float((per_col * np.arange(mask.shape[1])).sum() / per_col.sum())


def pneumothorax_side(mask: np.ndarray, right: np.ndarray | None, left: np.ndarray | None) -> str | None:
    """'right', 'left', 'both' or None, by the share of the mask on each lung's side of the chest.

    The chest is divided at the column halfway between the lungs' centroids (the image midline when
    a lung is missing), so a pneumothorax outside the collapsed lung's mask still gets its side.
    """
    area = int(mask.sum())
    if area == 0:
        return None
    split = mask.shape[1] / 2
    if right is not None and left is not None and right.any() and left.any():
        split = (_centroid_col(right) + _centroid_col(left)) / 2
    per_col = mask.sum(axis=0)
    right_share = float(per_col[: int(np.ceil(split))].sum()) / area  # patient's right is on the image left
    sides = [s for s, share in (("right", right_share), ("left", 1 - right_share)) if share >= SIDE_MIN_SHARE]
    return sides[0] if len(sides) == 1 else "both"


def _run_pneumothorax(cases: Sequence[_Case], runner: ModelRunner) -> None:
    card = runner.card("pneumothorax")
    thr = float(card.get("threshold", 0.5))
    presence_thr = float(card.get("presence_threshold", 0.5))
    min_area_fraction = float(card.get("min_area_fraction", 0.0))
    maps, presence = _predict_full("pneumothorax", cases, runner)
    for i, (c, prob) in enumerate(zip(cases, maps, strict=True)):
        mask = prob[0] > thr
        probability = float(presence[i]) if presence is not None else float(prob[0].max())
        present = probability > presence_thr and mask.sum() >= min_area_fraction * mask.size
        if not present:
            mask = np.zeros_like(mask)
        c.result.masks["pneumothorax"] = pack_mask(mask)
        c.result.pneumothorax_probability = round(probability, 4)
        c.result.pneumothorax_present = bool(present)
        c.result.pneumothorax_area_px = int(mask.sum())
        c.result.pneumothorax_side = pneumothorax_side(mask, c.right, c.left) if present else None
