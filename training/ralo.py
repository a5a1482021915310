"""Per-lung geographic extent (RALO, severity_ralo/) as a weak label of the opacity model.

Each severity_ralo/ image carries, from two radiologists, the geographic extent of opacity in each
lung on a 0-4 scale: 0 none, 1 < 25 %, 2 25-50 %, 3 50-75 %, 4 > 75 % of the lung involved. That is a
direct statement about the fraction of each lung the opacity model should mark, so it trains the
model through that fraction:

- per-lung fraction f = sum(p * lung) / sum(lung), lung = the three zones of that side of the shipped
  lung model's mask (the same zone maps as training.weak, so they move with the image);
- target: the interval of the raters' bins, from the lower edge of the lower rater's bin to the upper
  edge of the higher rater's bin (both raters agree on 2 -> [0.25, 0.50]; 1 and 2 -> [0, 0.50]);
- loss: a hinge that is zero inside the interval, max(0, lo - f) + max(0, f - hi), averaged over
  the lungs that have a label and a non-empty lung mask.

This 0-4 per-lung scale is NOT the 0-6 zone count of severity/ (covid_scoring) nor Brixia: RALO
samples carry only `extent_*` labels (their zone targets and score are NaN), so training.weak never
reads them and the two scales are never averaged into one number.

Evaluation (`python -m training evaluate extent`): the worker's per-lung opacity fraction (thresholded
mask inside the lung, workers.severity) is binned with the same edges and compared with the raters'
mean per lung (MAE on the 0-4 scale), on held-out folds.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data import Sample, image_path_of, load_gray, read_rows
from training.metrics import cohen_kappa
from training.severity_eval import load_models
from training.tasks import portable
from workers import severity

log = logging.getLogger(__name__)

SIDES = ("right", "left")  # patient's right / left, the order of workers.severity (zones 0-2 / 3-5)
#: Fraction of the lung (lower, upper edge) for each extent score 0-4.
EXTENT_BINS: tuple[tuple[float, float], ...] = ((0.0, 0.0), (0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))
#: A measured fraction at or below this counts as extent 0 ("none"): a few stray pixels are not an
#: involved lung. Upper edges of the bins above it: < 25 % -> 1, < 50 % -> 2, < 75 % -> 3, else 4.
NONE_FRACTION = 0.01


def is_ralo_folder(folder: Path) -> bool:
    """A severity_ralo-format folder (per-lung rater columns) rather than a severity/ one."""
    rows = read_rows(Path(folder))
    return bool(rows) and "r1_right_geographic" in rows[0]


def _num(value: str | None) -> float | None:
    if value is None or value.strip() in ("", "nan"):
        return None
    return float(value)


def rater_extents(row: dict[str, str]) -> dict[str, list[float]]:
    """{"right": [r1, r2], "left": [...]}: the raters' geographic extent scores (0-4) per lung."""
    out: dict[str, list[float]] = {}
    for side in SIDES:
        out[side] = [v for v in (_num(row.get(f"r{r}_{side}_geographic")) for r in (1, 2)) if v is not None]
    return out


def extent_interval(scores: Sequence[float]) -> tuple[float, float]:
    """Fraction interval that agrees with every rater's bin: (lower edge of the lowest score's bin,
    upper edge of the highest's); (nan, nan) without a score."""
    if not scores:
        return math.nan, math.nan
    lo_bin, hi_bin = round(min(scores)), round(max(scores))
    if not (0 <= lo_bin <= 4 and 0 <= hi_bin <= 4):
        raise ValueError(f"geographic extent scores {list(scores)} outside 0-4")
    return EXTENT_BINS[lo_bin][0], EXTENT_BINS[hi_bin][1]


def fraction_to_extent(fraction: float) -> int:
    """The 0-4 extent score of a lung whose measured opacity fraction is `fraction`."""
    if fraction <= NONE_FRACTION:
        return 0
    return 1 + sum(fraction >= edge for edge in (0.25, 0.5, 0.75))


def ralo_samples(folder: Path, folds: Sequence[int]) -> list[Sample]:
    """Weakly labelled samples of `folds`: per-lung extent interval and raters' mean, no pixel masks."""
    folder = Path(folder)
    samples = []
    for row in read_rows(folder):
        if int(row["fold"]) not in folds:
            continue
        extents = rater_extents(row)
        if not any(extents.values()):
            continue
        bounds = tuple(b for side in SIDES for b in extent_interval(extents[side]))
        means = tuple(float(np.mean(extents[side])) if extents[side] else math.nan for side in SIDES)
        image_id = row["id"]
        samples.append(
            Sample(
                folder.name,
                image_id,
                image_path_of(folder, row),
                {"opacity": None},
                row.get("patient_id") or f"{folder.name}:{image_id}",
                row=row,
                pixel_labels=False,
                extent_bounds=bounds,
                extent_score=means,
            )
        )
    log.info("%s: %d per-lung extent samples in folds %s", folder, len(samples), list(folds))
    return samples


def lung_masks(zones: torch.Tensor) -> torch.Tensor:
    """(B, 2, S, S) right/left lung masks from the (B, 6, S, S) zone maps (zones 0-2 right, 3-5 left)."""
    zones = zones.float()
    return torch.stack([zones[:, :3].sum(1), zones[:, 3:].sum(1)], 1).clamp_max(1.0)


def lung_fractions(prob: torch.Tensor, zones: torch.Tensor) -> torch.Tensor:
    """(B, 2) opacity fraction of the right and left lung; prob (B,1,S,S). An empty lung gives 0."""
    lungs = lung_masks(zones)
    return (prob[:, :1] * lungs).sum((2, 3)) / lungs.sum((2, 3)).clamp_min(1.0)


def extent_loss(logits: torch.Tensor, zones: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Mean interval hinge over the labelled, non-empty lungs of the batch (0 when there are none).

    bounds (B, 4): right lo, right hi, left lo, left hi (NaN = no label)."""
    fractions = lung_fractions(torch.sigmoid(logits[:, :1]), zones)
    lo, hi = bounds[:, 0::2], bounds[:, 1::2]
    known = ~torch.isnan(lo) & ~torch.isnan(hi) & (lung_masks(zones).sum((2, 3)) > 0)
    if not known.any():
        return logits.sum() * 0.0
    hinge = torch.relu(torch.nan_to_num(lo) - fractions) + torch.relu(fractions - torch.nan_to_num(hi))
    return (hinge * known).sum() / known.sum()


def hard_extents(prob: torch.Tensor, zones: torch.Tensor, pixel_threshold: float = 0.5) -> torch.Tensor:
    """(B, 2) extent scores 0-4 of the thresholded mask (validation during training)."""
    fractions = lung_fractions((prob[:, :1] > pixel_threshold).float(), zones)
    return torch.tensor([[fraction_to_extent(float(f)) for f in row] for row in fractions])


# --- evaluation -------------------------------------------------------------------------------------


def _mae(pred: Sequence[float], ref: Sequence[float]) -> float | None:
    return round(float(np.mean(np.abs(np.asarray(pred, float) - np.asarray(ref, float)))), 4) if ref else None


def summarise_extents(rows: Sequence[dict[str, Any]], all_rows: Sequence[dict[str, str]] = ()) -> dict[str, Any]:
    """MAE (0-4 per lung) against the raters' mean, per lung and both together, per fold, with a
    quadratic-weighted kappa against the rounded mean, the raters' own disagreement and a constant
    baseline (the rounded mean extent of the label rows of the OTHER folds, `all_rows`)."""
    out: dict[str, Any] = {
        "n_images": len(rows),
        "scale": "RALO geographic extent per lung, 0-4 "
        "(none, <25%, 25-50%, 50-75%, >75%); reference = mean of the two raters",
    }
    pairs: dict[str, tuple[list[float], list[float]]] = {}
    for side in SIDES:
        pred = [r[f"{side}_extent"] for r in rows if r[f"{side}_reference"] is not None]
        ref = [r[f"{side}_reference"] for r in rows if r[f"{side}_reference"] is not None]
        pairs[side] = (pred, ref)
    both_pred = pairs["right"][0] + pairs["left"][0]
    both_ref = pairs["right"][1] + pairs["left"][1]
    out["mae"] = {"right": _mae(*pairs["right"]), "left": _mae(*pairs["left"]), "both": _mae(both_pred, both_ref)}
    out["quadratic_kappa_vs_rounded_mean"] = (
        round(
            cohen_kappa([math.floor(r + 0.5) for r in both_ref], [int(p) for p in both_pred], 5, weights="quadratic"), 4
        )
        if both_ref
        else None
    )
    out["mean_signed_error"] = round(float(np.mean(np.subtract(both_pred, both_ref))), 4) if both_ref else None
    out["per_fold"] = {}
    for f in sorted({r["fold"] for r in rows}):
        fr = [r for r in rows if r["fold"] == f]
        p = [r[f"{s}_extent"] for r in fr for s in SIDES if r[f"{s}_reference"] is not None]
        ref = [r[f"{s}_reference"] for r in fr for s in SIDES if r[f"{s}_reference"] is not None]
        out["per_fold"][str(f)] = {"n_images": len(fr), "mae_both": _mae(p, ref)}
    # One rater against the two raters' mean: the floor any model can be expected to reach.
    rater = [
        abs(r["raters"][side][0] - r[f"{side}_reference"])
        for r in rows
        for side in SIDES
        if len(r["raters"][side]) == 2
    ]
    out["rater_vs_mean_mae"] = round(float(np.mean(rater)), 4) if rater else None
    if all_rows:
        errors = []
        for r in rows:
            others = [
                float(np.mean(v))
                for o in all_rows
                if int(o["fold"]) != r["fold"]
                for v in rater_extents(o).values()
                if v
            ]
            const = math.floor(float(np.mean(others)) + 0.5) if others else 0
            errors += [abs(const - r[f"{s}_reference"]) for s in SIDES if r[f"{s}_reference"] is not None]
        out["baseline_constant_mae"] = round(float(np.mean(errors)), 4) if errors else None
    return out


def evaluate_extent(
    folder: Path,
    out_dir: Path,
    *,
    folds: Sequence[int] | None = None,
    weights_dir: Path | None = None,
    lung_checkpoint: Path | None = None,
    opacity_checkpoint: Path | None = None,
    tta: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Per-lung extent of the worker's masks (lung model -> split_lungs, opacity mask at the card's
    threshold -> workers.severity per-lung fraction -> 0-4 bin) against the RALO raters."""
    folder = Path(folder)
    if not is_ralo_folder(folder):
        raise ValueError(f"{folder}: not a severity_ralo-format folder (no r1_right_geographic column)")
    lung, opacity = load_models(weights_dir, lung_checkpoint, opacity_checkpoint, tta)
    all_rows = read_rows(folder)
    selected = [r for r in all_rows if folds is None or int(r["fold"]) in folds]
    rows: list[dict[str, Any]] = []
    for i, row in enumerate(selected):
        image = load_gray(image_path_of(folder, row))
        right, left = severity.split_lungs(lung.mask(image))
        res = severity.score(right, left, opacity.mask(image), threshold=0.0)
        raters = rater_extents(row)
        r: dict[str, Any] = {"id": row["id"], "fold": int(row["fold"]), "raters": raters}
        for side in SIDES:
            fraction = float(res.opacity_fraction[side])
            r[f"{side}_fraction"] = round(fraction, 5)
            r[f"{side}_extent"] = fraction_to_extent(fraction)
            r[f"{side}_reference"] = float(np.mean(raters[side])) if raters[side] else None
            r[f"{side}_lung_px"] = int(res.lung_area_px[side])
        rows.append(r)
        if (i + 1) % 100 == 0:
            log.info("extent: %d/%d images", i + 1, len(selected))
    summary = summarise_extents(rows, all_rows)
    summary |= {
        "data": portable(str(folder)),
        "folds": list(folds) if folds is not None else "all",
        "opacity_threshold": opacity.threshold,
        "none_fraction": NONE_FRACTION,
        "tta": {"lung": [t.name for t in lung.transforms], "opacity": [t.name for t in opacity.transforms]},
        "checkpoints": {
            k: str(v)
            for k, v in (("lung_checkpoint", lung_checkpoint), ("opacity_checkpoint", opacity_checkpoint))
            if v
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "extents.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "fold", *(f"{s}_{k}" for s in SIDES for k in ("fraction", "extent", "reference", "lung_px"))])
        for r in rows:
            w.writerow(
                [
                    r["id"],
                    r["fold"],
                    *(r[f"{s}_{k}"] for s in SIDES for k in ("fraction", "extent", "reference", "lung_px")),
                ]
            )
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    log.info(
        "extent: MAE per lung %s (baseline %s, raters %s)",
        summary["mae"],
        summary.get("baseline_constant_mae"),
        summary["rater_vs_mean_mae"],
    )
    return summary
