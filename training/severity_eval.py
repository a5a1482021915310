"""Severity (0-6 affected zones) of lung model + opacity model + the worker's zone rule vs raters.

References in severity/labels.csv:
- covid_scoring: `score_r`, `score_d` (0-6, two raters); the reference is their mean where both exist.
- Brixia: zones A-F scored 0-3 by a senior rater; A/B/C = right upper/middle/lower, D/E/F = left
  upper/middle/lower (BrixIA convention), a zone counts as affected when its score is >= 1.

The zone threshold (jointly with the opacity model's pixel threshold, from PIXEL_THRESHOLDS) is chosen
by cross-validation over the patient folds (`fold` column): for each fold the pair that minimises the
MAE on the OTHER folds is applied to it, so every reported figure is on images whose thresholds never
saw them. The pair to ship (card `zone_threshold` and opacity `threshold`) is then chosen on all folds.
Neither model is trained on severity/ scores (the opacity model learns from covid_opacity pixel masks
only), but many severity images are also in lung/darwin_covid (`in_darwin`), so the lung model may have
trained on their lung masks: with `lung_split` the CV figures are also given for the images whose lung
mask the lung run did NOT train on.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.data import image_path_of, load_gray, read_rows
from training.metrics import cohen_kappa, severity_agreement
from training.predict import Segmenter
from workers import severity

log = logging.getLogger(__name__)

BRIXIA_ZONES = ("A", "B", "C", "D", "E", "F")  # = RU, RM, RL, LU, LM, LL of workers.severity
THRESHOLDS = np.round(np.arange(0.01, 0.96, 0.01), 2)
#: Opacity pixel thresholds that `--opacity-thresholds` may try with each zone threshold (the worker
#: applies the opacity card's `threshold` to the probabilities before it measures the zone fractions;
#: by default only that one is used, so the displayed opacity mask keeps its Dice-optimal threshold).
PIXEL_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def _num(value: str | None) -> float | None:
    if value is None or value.strip() in ("", "nan"):
        return None
    return float(value)


def rater_mean(row: dict[str, str]) -> float | None:
    scores = [v for v in (_num(row.get("score_r")), _num(row.get("score_d"))) if v is not None]
    return float(np.mean(scores)) if scores else None


def brixia_scores(row: dict[str, str]) -> list[float | None]:
    """The six Brixia zone scores (0-3; None where not scored), in workers.severity zone order."""
    return [_num(row.get(f"brixia_{z}")) for z in BRIXIA_ZONES]


def brixia_affected(row: dict[str, str]) -> list[bool] | None:
    zones = brixia_scores(row)
    if any(z is None for z in zones):
        return None
    return [bool(z is not None and z >= 1) for z in zones]


def load_models(
    weights_dir: Path | None = None,
    lung_checkpoint: Path | None = None,
    opacity_checkpoint: Path | None = None,
    tta: Mapping[str, Sequence[str]] | None = None,
) -> tuple[Segmenter, Segmenter]:
    """(lung, opacity): checkpoints where given, else the weights in `weights_dir` (default: shipped);
    `tta` maps a model name to its test-time transforms (else the card's)."""
    tta = tta or {}
    return (
        Segmenter.load("lung", weights_dir, lung_checkpoint, tta_names=tta.get("lung")),
        Segmenter.load("opacity", weights_dir, opacity_checkpoint, tta_names=tta.get("opacity")),
    )


def zone_fractions(
    folder: Path,
    out_dir: Path,
    lung: Segmenter,
    opacity: Segmenter,
    *,
    pixel_thresholds: Sequence[float] = (),
    folds: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Per image: the six zone opacity fractions from the two models (cached in zone_fractions.csv).

    `folds`: only images of these folds (e.g. the folds an opacity model trained with weak labels
    never saw)."""
    rows: list[dict[str, Any]] = []
    selected = [r for r in read_rows(folder) if folds is None or int(r["fold"]) in folds]
    for i, row in enumerate(selected):
        image_id = row.get("image_id") or row["id"]
        image = load_gray(image_path_of(folder, row))
        right, left = severity.split_lungs(lung.mask(image))
        opacity_prob = opacity.prob(image)
        res = severity.score(right, left, opacity_prob > opacity.threshold, threshold=0.0)
        by_pixel = {
            pt: [round(f, 5) for f in severity.score(right, left, opacity_prob > pt, threshold=0.0).zone_fractions]
            for pt in pixel_thresholds
        }
        rows.append(
            {
                "image_id": image_id,
                "fold": int(row["fold"]),
                "source": row.get("source", ""),
                "reference": rater_mean(row),
                "brixia": brixia_affected(row),
                "fractions": [round(f, 5) for f in res.zone_fractions],
                "opacity_threshold": opacity.threshold,
                "fractions_by_pixel": by_pixel,
                "lung_area_px": res.lung_area_px,
            }
        )
        if (i + 1) % 50 == 0:
            log.info("severity: %d images", i + 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "zone_fractions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "image_id",
                "fold",
                "source",
                "reference",
                "brixia_affected",
                "RU",
                "RM",
                "RL",
                "LU",
                "LM",
                "LL",
                "right_area_px",
                "left_area_px",
            ]
        )
        for r in rows:
            w.writerow(
                [
                    r["image_id"],
                    r["fold"],
                    r["source"],
                    r["reference"],
                    "" if r["brixia"] is None else "".join("1" if b else "0" for b in r["brixia"]),
                    *r["fractions"],
                    r["lung_area_px"]["right"],
                    r["lung_area_px"]["left"],
                ]
            )
    return rows


Params = tuple[float | None, float]  # (opacity pixel threshold; None = as evaluated, zone threshold)


def _fractions(row: dict[str, Any], pixel: float | None) -> list[float]:
    by_pixel = row.get("fractions_by_pixel") or {}
    return list(by_pixel[pixel]) if pixel is not None and pixel in by_pixel else list(row["fractions"])


def _scores(rows: Sequence[dict[str, Any]], params: Params) -> np.ndarray:
    pixel, zone = params
    return np.array([sum(f > zone for f in _fractions(r, pixel)) for r in rows], dtype=int)


def best_threshold(rows: Sequence[dict[str, Any]]) -> Params:
    """(pixel, zone) thresholds with the lowest MAE vs the raters' mean (ties: the first, i.e. smaller)."""
    ref = np.array([r["reference"] for r in rows], float)
    pixels: list[float | None] = sorted({p for r in rows for p in (r.get("fractions_by_pixel") or {})}) or [None]
    grid = [(p, float(z)) for p in pixels for z in THRESHOLDS]
    maes = [float(np.mean(np.abs(_scores(rows, g) - ref))) for g in grid]
    return grid[int(np.argmin(maes))]


def lung_trained_ids(folder: Path, lung_split: Path) -> set[str]:
    """Severity image ids whose lung mask was in the lung run's training set (same file in darwin_covid)."""
    import json

    train = json.loads(lung_split.read_text())["train"].get("darwin_covid", [])
    darwin_index = folder.parent / "lung" / "darwin_covid" / "index.csv"
    if not darwin_index.exists():
        return set()
    by_filename = {r["filename"]: r["id"] for r in read_rows(darwin_index.parent)}
    trained = set(train)
    return {
        r.get("image_id") or r["id"]
        for r in read_rows(folder)
        if r.get("in_darwin") == "1" and by_filename.get(r.get("filename", "")) in trained
    }


def constant_baseline_errors(rows: Sequence[dict[str, Any]]) -> list[float]:
    """Honest baseline: each row's error when the rounded mean reference of the OTHER folds is
    predicted for it (rows need "fold" and "reference"; at least two folds)."""
    return [
        abs(round(float(np.mean([o["reference"] for o in rows if o["fold"] != r["fold"]]))) - r["reference"])
        for r in rows
    ]


def cross_validate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    scored = [r for r in rows if r["reference"] is not None]
    folds = sorted({r["fold"] for r in scored})
    preds: dict[str, int] = {}
    thr_for_row: dict[str, float] = {}
    per_fold = {}
    for f in folds:
        params = best_threshold([r for r in scored if r["fold"] != f])
        test = [r for r in scored if r["fold"] == f]
        for r, p in zip(test, _scores(test, params), strict=True):
            preds[r["image_id"]], thr_for_row[r["image_id"]] = int(p), params[1]
        ref = [r["reference"] for r in test]
        per_fold[str(f)] = {
            "threshold": params[1],
            "opacity_threshold": params[0],
            "n": len(test),
            "mae": round(float(np.mean(np.abs(np.array([preds[r["image_id"]] for r in test]) - ref))), 4),
        }
    ref_all = [r["reference"] for r in scored]
    cv = severity_agreement(ref_all, [preds[r["image_id"]] for r in scored])
    base = constant_baseline_errors(scored)
    ship = best_threshold(scored)
    in_sample = severity_agreement(ref_all, list(_scores(scored, ship)))
    brixia = [r for r in rows if r["brixia"] is not None]
    zone = {}
    if brixia:
        # Zone-level agreement with Brixia (>=1 = affected) at the shipped threshold; the Brixia
        # labels were not used to pick it.
        truth = np.array([r["brixia"] for r in brixia], bool)
        pred = np.array([[f > ship[1] for f in _fractions(r, ship[0])] for r in brixia], bool)
        zone = {
            "n_images": len(brixia),
            "threshold": ship[1],
            "opacity_threshold": ship[0],
            "zone_accuracy": round(float((truth == pred).mean()), 4),
            "zone_kappa": round(
                cohen_kappa(truth.ravel().astype(int).tolist(), pred.ravel().astype(int).tolist(), 2), 4
            ),
            "per_zone_accuracy": {
                z: round(float((truth[:, k] == pred[:, k]).mean()), 4) for k, z in enumerate(BRIXIA_ZONES)
            },
            "count_mae_vs_brixia_zone_count": round(float(np.mean(np.abs(pred.sum(1) - truth.sum(1)))), 4),
        }
    unseen = [r for r in scored if not r.get("lung_trained")]
    cv_unseen = severity_agreement([r["reference"] for r in unseen], [preds[r["image_id"]] for r in unseen])
    return {
        "reference": "mean of covid_scoring raters score_r/score_d (one where only one)",
        "cv": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in cv.items()},
        "cv_lung_mask_unseen": {
            k: (round(v, 4) if isinstance(v, float) else v) for k, v in cv_unseen.items() if k != "confusion_matrix"
        },
        "cv_per_fold": per_fold,
        "baseline_constant_mae": round(float(np.mean(base)), 4),
        "zone_threshold": ship[1],
        "opacity_threshold": ship[0] if ship[0] is not None else (rows[0].get("opacity_threshold") if rows else None),
        "in_sample_at_zone_threshold": {k: v for k, v in in_sample.items() if k != "confusion_matrix"},
        "brixia_zones": zone,
        "n_without_reference": len(rows) - len(scored),
    }


def normals_check(
    folders: Sequence[Path], split_file: Path | None, zone_threshold: float, lung: Segmenter, opacity: Segmenter
) -> dict[str, Any]:
    """Severity on images known to be free of COVID opacity (JSRT: normals and nodules): every zone
    counted there is a false alarm. With `split_file`, only the images the run did not train on (its
    validation side and the negatives it never drew)."""
    from training.data import read_folder
    from training.evaluate import select

    samples = select([s for f in folders for s in read_folder(Path(f), (), require_masks=False)], split_file, "heldout")
    scores = []
    for s in samples:
        image = load_gray(s.image)
        right, left = severity.split_lungs(lung.mask(image))
        scores.append(severity.score(right, left, opacity.mask(image), threshold=zone_threshold).score)
    counts = np.bincount(scores, minlength=7) if scores else np.zeros(7, int)
    return {
        "folders": [str(f) for f in folders],
        "split": str(split_file) if split_file else None,
        "n": len(scores),
        "zone_threshold": zone_threshold,
        "mean_score": round(float(np.mean(scores)), 4) if scores else None,
        "fraction_score_0": round(float(counts[0] / max(1, len(scores))), 4),
        "score_counts": counts.tolist(),
    }


def evaluate_severity(
    folder: Path,
    out_dir: Path,
    *,
    lung_split: Path | None = None,
    normals: Sequence[Path] = (),
    normals_split: Path | None = None,
    weights_dir: Path | None = None,
    lung_checkpoint: Path | None = None,
    opacity_checkpoint: Path | None = None,
    pixel_thresholds: Sequence[float] = (),
    folds: Sequence[int] | None = None,
    tta: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    if folds is not None and len(set(folds)) < 2:
        raise ValueError(
            f"--folds {' '.join(map(str, folds))}: the zone threshold of each fold is tuned on the "
            "others, so give at least two folds (or use `crossval` for per-fold models)"
        )
    lung, opacity = load_models(weights_dir, lung_checkpoint, opacity_checkpoint, tta)
    rows = zone_fractions(folder, out_dir, lung, opacity, pixel_thresholds=pixel_thresholds, folds=folds)
    trained = lung_trained_ids(folder, lung_split) if lung_split else set()
    for r in rows:
        r["lung_trained"] = r["image_id"] in trained
    summary = cross_validate(rows)
    summary["n_lung_mask_trained"] = len(trained)
    summary["data"] = str(folder)
    summary["checkpoints"] = {
        k: str(v)
        for k, v in (("lung_checkpoint", lung_checkpoint), ("opacity_checkpoint", opacity_checkpoint))
        if v is not None
    }
    summary["folds"] = folds or "all"
    summary["tta"] = {"lung": [t.name for t in lung.transforms], "opacity": [t.name for t in opacity.transforms]}
    if normals:
        summary["normals"] = normals_check(normals, normals_split, summary["zone_threshold"], lung, opacity)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    log.info(
        "severity: CV MAE %.3f (baseline %.3f), zone_threshold %.2f",
        summary["cv"]["mae"],
        summary["baseline_constant_mae"],
        summary["zone_threshold"],
    )
    return summary


def rows_from_csv(path: Path) -> list[dict[str, Any]]:
    """Re-read zone_fractions.csv (re-tune thresholds without running the models again)."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            ref = r["reference"]
            out.append(
                {
                    "image_id": r["image_id"],
                    "fold": int(r["fold"]),
                    "source": r["source"],
                    "reference": None if ref in ("", "None") else float(ref),
                    "brixia": [c == "1" for c in r["brixia_affected"]] if r["brixia_affected"] else None,
                    "fractions": [float(r[z]) for z in ("RU", "RM", "RL", "LU", "LM", "LL")],
                }
            )
    return out
