"""Evaluation of a model on any shared-format folder, through the worker's preprocessing.

Segmentation: Dice, IoU and HD95 per image and structure at the image's own grid (pixels excluded by
masks/ignore do not count), a per-image CSV and a JSON summary overall and per source folder. The lung
model is scored on the two lungs the worker delivers (`workers.severity.split_lungs`; `dice_raw` is
the network's thresholded mask before that rule), and per side where a folder has
right_lung/left_lung masks (JSRT). The pneumothorax model adds presence
(the worker's rule: aux probability > presence_threshold) with accuracy per source.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.data import Sample, load_gray, load_mask, read_folder
from training.metrics import dice, hd95, iou
from training.predict import load_model, predict
from training.splits import read_split
from workers import severity, tta

log = logging.getLogger(__name__)

STRUCTURE = {"lung": "lungs", "opacity": "opacity", "pneumothorax": "pneumothorax"}


def select(samples: Sequence[Sample], split_file: Path | None, subset: str, max_per_source: int = 0) -> list[Sample]:
    """Samples of the split's `subset`: "train", "validation", or "heldout" (every image the run did
    not train on: its validation images plus those it never drew, e.g. unused negatives)."""
    chosen = list(samples)
    if split_file is not None:
        sides = read_split(split_file)
        if subset == "heldout":
            chosen = [s for s in chosen if f"{s.source}/{s.id}" not in sides["train"]]
        else:
            chosen = [s for s in chosen if f"{s.source}/{s.id}" in sides[subset]]
    if max_per_source:
        counts: dict[str, int] = {}
        kept = []
        for s in chosen:
            counts[s.source] = counts.get(s.source, 0) + 1
            if counts[s.source] <= max_per_source:
                kept.append(s)
        chosen = kept
    return chosen


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


HIGHER_IS_BETTER = {"dice", "iou", "dice_right", "dice_left", "dice_raw", "presence_correct"}


def summarise(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    def block(rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"n": len(rs)}
        for k in keys:
            vals = [float(r[k]) for r in rs if r.get(k) not in (None, "")]
            finite = [v for v in vals if not math.isnan(v)]
            if vals:
                out[k] = round(_mean(vals), 4)
                out[f"{k}_median"] = round(float(np.median(finite)), 4) if finite else math.nan
                if len(finite) < len(vals):
                    out[f"{k}_undefined"] = len(vals) - len(finite)
        return out

    sources = sorted({r["source"] for r in rows})
    by_source = {s: block([r for r in rows if r["source"] == s]) for s in sources}
    # Each source counted once (goals such as "Dice >= 0.95 on each source" are per source).
    source_mean: dict[str, Any] = {"n_sources": len(sources)}
    for k in keys:
        per = [b[k] for b in by_source.values() if k in b and not math.isnan(b[k])]
        if per and len(per) == len(sources):
            source_mean[k] = round(float(np.mean(per)), 4)
            if k in HIGHER_IS_BETTER:
                source_mean[f"{k}_worst_source"] = min(per)
    return {"overall": block(rows), "by_source": by_source, "source_mean": source_mean}


def _spacing(s: Sample) -> float | None:
    for key in ("pixel_spacing_mm_resized",):
        if s.row.get(key):
            return float(s.row[key])
    return None


def evaluate_segmentation(
    name: str,
    folders: Sequence[Path],
    out_dir: Path,
    *,
    weights_dir: Path | None = None,
    checkpoint: Path | None = None,
    split_file: Path | None = None,
    subset: str = "validation",
    negatives: Sequence[Path] = (),
    threshold: float | None = None,
    presence_threshold: float | None = None,
    max_per_source: int = 0,
    tta_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """`tta_names`: test-time transforms (`workers.tta`) instead of the card's."""
    model, spec, card = load_model(name, weights_dir, checkpoint)
    transforms = tta.card_transforms(card, tta_names)
    thr = threshold if threshold is not None else float(card.get("threshold", 0.5))
    p_thr = presence_threshold if presence_threshold is not None else float(card.get("presence_threshold", 0.5))
    structure = STRUCTURE[name]
    samples = [s for f in folders for s in read_folder(Path(f), (structure,))]
    samples += [s for f in negatives for s in read_folder(Path(f), (structure,), negative=True)]
    samples = select(samples, split_file, subset, max_per_source)
    if not samples:
        raise ValueError(f"no images with {structure} masks in {list(folders)} (after the split filter)")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for i, s in enumerate(samples):
        image = load_gray(s.image)
        prob, presence = predict(model, spec, image, transforms)
        pred = prob[0] > thr
        truth = load_mask(s.masks[structure], image.shape)
        valid = ~load_mask(s.ignore, image.shape) if s.ignore else None
        row: dict[str, Any] = {"source": s.source, "id": s.id, "truth_px": int(truth.sum()), "pred_px": int(pred.sum())}
        if presence is not None:
            present = presence > p_thr
            row |= {
                "presence_prob": round(presence, 4),
                "present": int(present),
                "truth_present": int(truth.any()),
                "presence_correct": int(present == bool(truth.any())),
            }
            if not present:  # the worker reports no mask when presence is below threshold
                pred = np.zeros_like(pred)
        t_eval = truth if valid is None else truth & valid
        if name == "lung":
            # Scored as the worker delivers it: its two lungs (workers.severity.split_lungs drops
            # specks and extra components), and the network's raw mask beside it for comparison.
            row["dice_raw"] = dice(pred if valid is None else pred & valid, t_eval)
            right, left = severity.split_lungs(pred)
            pred = right | left
            row |= _side_metrics(s, right, left, image.shape)
        p_eval = pred if valid is None else pred & valid
        row |= {"dice": dice(p_eval, t_eval), "iou": iou(p_eval, t_eval), "hd95_px": hd95(p_eval, t_eval)}
        if t_eval.any():
            # Predicted / true area: far from 1 across a whole source is a mask convention apart (e.g.
            # the lung behind the heart, drawn in one set and not in another), not scattered errors.
            row["area_ratio"] = round(float(p_eval.sum() / t_eval.sum()), 4)
        if (sp := _spacing(s)) is not None:
            row["hd95_mm"] = row["hd95_px"] * sp
        rows.append(row)
        if (i + 1) % 50 == 0:
            log.info("evaluated %d/%d", i + 1, len(samples))
    keys = [
        k
        for k in (
            "dice",
            "iou",
            "hd95_px",
            "hd95_mm",
            "dice_right",
            "dice_left",
            "dice_raw",
            "presence_correct",
            "presence_prob",
            "area_ratio",
        )
        if any(k in r for r in rows)
    ]
    summary = summarise(rows, keys)
    if name == "pneumothorax":
        pos = [r for r in rows if r["truth_present"]]
        summary["dice_positives"] = summarise(pos, ["dice", "iou", "hd95_px"])["overall"] if pos else None
        summary["presence"] = presence_summary(rows)
    summary |= {
        "model": name,
        "spec": spec.__dict__,
        "threshold": thr,
        "presence_threshold": p_thr if name == "pneumothorax" else None,
        "data": [str(f) for f in folders],
        "negatives": [str(f) for f in negatives],
        "split": str(split_file) if split_file else None,
        "subset": subset if split_file else "all",
        "max_per_source": max_per_source,
        "weights_sha256": card.get("sha256"),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "tta": [t.name for t in transforms],
    }
    _write(out_dir, rows, summary)
    return summary


def presence_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Sensitivity, specificity and their mean (balanced accuracy): the overall accuracy alone would
    mostly count the many easy negatives."""
    pos = [r for r in rows if r["truth_present"]]
    neg = [r for r in rows if not r["truth_present"]]
    sens = float(np.mean([r["present"] for r in pos])) if pos else math.nan
    spec = float(np.mean([1 - r["present"] for r in neg])) if neg else math.nan
    return {
        "n_positive": len(pos),
        "n_negative": len(neg),
        "sensitivity": round(sens, 4),
        "specificity": round(spec, 4),
        "balanced_accuracy": round((sens + spec) / 2, 4),
    }


def _side_metrics(s: Sample, right: np.ndarray, left: np.ndarray, shape: tuple[int, int]) -> dict[str, float]:
    folder = s.image.parent.parent
    paths = {side: folder / "masks" / f"{side}_lung" / f"{s.id}.png" for side in ("right", "left")}
    if not all(p.exists() for p in paths.values()):
        return {}
    return {
        "dice_right": dice(right, load_mask(paths["right"], shape)),
        "dice_left": dice(left, load_mask(paths["left"], shape)),
    }


def _write(out_dir: Path, rows: Sequence[dict[str, Any]], summary: dict[str, Any]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(out_dir / "per_image.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()})
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str, allow_nan=True) + "\n")
    log.info("wrote %s: %s", out_dir / "summary.json", json.dumps(summary["overall"]))
