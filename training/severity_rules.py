"""Which rule should turn the SEG's lung and opacity masks into the 0-6 severity score?

The worker counts the zones whose opacity fraction exceeds one threshold (workers.severity). Every
training recipe tried for issue 16 left that score's error near 1.0, so this asks, without training,
whether the rule itself leaves error on the table: one threshold per row of zones (upper, middle,
lower, shared by both lungs), one per zone, a soft count, or the zone's mean opacity probability.

Protocol (training/recipes/severity_rules8.md, written before any figure): the opacity model trained
its weak zone loss on severity folds 0-2, so only folds 3 and 4 can fit a rule; each rule is fitted on
one and scored on the other, and the pooled error is compared with the shipped rule's under the same
protocol. Zones called on opacity-free images measure what a rule costs in false alarms.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.data import image_path_of, load_gray, read_folder, read_rows
from training.metrics import severity_agreement
from training.predict import Segmenter
from training.severity_eval import load_models, rater_mean
from workers import severity

log = logging.getLogger(__name__)

GRID = np.round(np.arange(0.01, 0.96, 0.01), 2)


@dataclass(frozen=True)
class ZoneFeatures:
    """Per image, in workers.severity zone order (RU, RM, RL, LU, LM, LL)."""

    fractions: np.ndarray  # opacity fraction (mask at the card's pixel threshold) inside each zone
    mean_prob: np.ndarray  # mean opacity probability inside each zone


def zone_features(image: np.ndarray, lung: Segmenter, opacity: Segmenter) -> ZoneFeatures:
    right, left = severity.split_lungs(lung.mask(image))
    prob = opacity.prob(image)
    mask = prob > opacity.threshold
    zones = [z for side in (right, left) for z in severity.zone_masks(side)]
    fractions = [float(mask[z].mean()) if z.any() else 0.0 for z in zones]
    mean_prob = [float(prob[z].mean()) if z.any() else 0.0 for z in zones]
    return ZoneFeatures(np.array(fractions), np.array(mean_prob))


# A rule maps an (n, 6) feature array and its parameters to n integer scores.
Rule = Callable[[np.ndarray, np.ndarray], np.ndarray]

ROW_OF_ZONE = np.array([0, 1, 2, 0, 1, 2])  # upper, middle, lower for RU..LL


def count_rule(features: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Zones whose feature exceeds its threshold (thresholds: 1, 3 per row, or 6 per zone)."""
    t = np.asarray(thresholds, float)
    per_zone = np.broadcast_to(t, (6,)) if t.size == 1 else (t[ROW_OF_ZONE] if t.size == 3 else t)
    return np.asarray((features > per_zone).sum(axis=1))


def soft_count_rule(features: np.ndarray, params: np.ndarray) -> np.ndarray:
    """round(sum of min(1, fraction / t)): a zone just under the threshold still counts in part."""
    t = float(np.asarray(params).ravel()[0])
    return np.asarray(np.rint(np.minimum(1.0, features / t).sum(axis=1)).astype(int))


def _mae(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - ref)))


def fit_single(features: np.ndarray, ref: np.ndarray, rule: Rule = count_rule) -> np.ndarray:
    """The grid value with the lowest MAE (ties: the smallest)."""
    maes = [_mae(rule(features, np.array([t])), ref) for t in GRID]
    return np.array([GRID[int(np.argmin(maes))]])


def fit_rows(features: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Three thresholds (upper, middle, lower) by exhaustive grid search: each row adds 0-2 zones, so
    the score for every combination is a sum of three precomputed (grid, n) tables."""
    per_row = [
        np.stack([(features[:, r == ROW_OF_ZONE] > t).sum(axis=1) for t in GRID]) for r in range(3)
    ]  # 3 x (len(GRID), n)
    best = (np.inf, 0, 0, 0)
    for i in range(len(GRID)):
        # (j, k, n) scores for this upper threshold
        total = per_row[0][i][None, None, :] + per_row[1][:, None, :] + per_row[2][None, :, :]
        maes = np.abs(total - ref[None, None, :]).mean(axis=2)
        j, k = np.unravel_index(int(np.argmin(maes)), maes.shape)
        if maes[j, k] < best[0] - 1e-12:
            best = (float(maes[j, k]), i, int(j), int(k))
    return GRID[[best[1], best[2], best[3]]]


def fit_zones(features: np.ndarray, ref: np.ndarray, sweeps: int = 3) -> np.ndarray:
    """Six thresholds by coordinate descent from the best single threshold."""
    t = np.repeat(fit_single(features, ref), 6)
    for _ in range(sweeps):
        for z in range(6):
            maes = []
            for g in GRID:
                trial = t.copy()
                trial[z] = g
                maes.append(_mae(count_rule(features, trial), ref))
            t[z] = GRID[int(np.argmin(maes))]
    return t


@dataclass(frozen=True)
class RuleSpec:
    name: str
    feature: str  # "fractions" or "mean_prob"
    rule: Rule
    fit: Callable[[np.ndarray, np.ndarray], np.ndarray]


RULES = (
    RuleSpec("shipped: one threshold", "fractions", count_rule, fit_single),
    RuleSpec("candidate: one threshold per row", "fractions", count_rule, fit_rows),
    RuleSpec("ablation: one threshold per zone", "fractions", count_rule, fit_zones),
    RuleSpec("ablation: soft count", "fractions", soft_count_rule, lambda f, r: fit_single(f, r, soft_count_rule)),
    RuleSpec("ablation: mean probability", "mean_prob", count_rule, fit_single),
)


def cross_fit(spec: RuleSpec, feats: dict[int, np.ndarray], refs: dict[int, np.ndarray]) -> dict[str, Any]:
    """Fit on each fold, score every other fold with it (two folds: each scores the other)."""
    folds = sorted(feats)
    preds, truth, per_fold = [], [], {}
    for f in folds:
        others = [o for o in folds if o != f]
        params = spec.fit(np.concatenate([feats[o] for o in others]), np.concatenate([refs[o] for o in others]))
        pred = spec.rule(feats[f], params)
        preds.append(pred)
        truth.append(refs[f])
        per_fold[str(f)] = {"params": [float(p) for p in params], "n": len(pred), "mae": round(_mae(pred, refs[f]), 4)}
    agreement = severity_agreement(list(np.concatenate(truth)), [int(p) for p in np.concatenate(preds)])
    return {
        "cv": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in agreement.items()},
        "per_fold": per_fold,
        "fitted_on_all": [
            float(p) for p in spec.fit(np.concatenate(list(feats.values())), np.concatenate(list(refs.values())))
        ],
    }


def evaluate_rules(
    folder: Path,
    out_dir: Path,
    folds: Sequence[int],
    normals: Sequence[Path] = (),
    normals_where: dict[str, str] | None = None,
    normals_split: Path | None = None,
    weights_dir: Path | None = None,
    lung_checkpoint: Path | None = None,
    opacity_checkpoint: Path | None = None,
) -> dict[str, Any]:
    """`normals_split`: a run's split.json, to count only the normals it did not train on."""
    from training.evaluate import select

    if len(set(folds)) < 2:
        raise ValueError("give at least two folds: each rule is fitted on one and scored on another")
    lung, opacity = load_models(weights_dir, lung_checkpoint, opacity_checkpoint, None)
    feats: dict[int, dict[str, list[np.ndarray]]] = {}
    refs: dict[int, list[float]] = {}
    for row in read_rows(folder):
        ref = rater_mean(row)
        if int(row["fold"]) not in folds or ref is None:
            continue
        zf = zone_features(load_gray(image_path_of(folder, row)), lung, opacity)
        f = int(row["fold"])
        feats.setdefault(f, {"fractions": [], "mean_prob": []})
        feats[f]["fractions"].append(zf.fractions)
        feats[f]["mean_prob"].append(zf.mean_prob)
        refs.setdefault(f, []).append(ref)
    ref_arr = {f: np.array(v) for f, v in refs.items()}
    normal_feats: dict[str, dict[str, np.ndarray]] = {}
    for folder_n in normals:
        samples = [
            s
            for s in select(read_folder(Path(folder_n), (), require_masks=False), normals_split, "heldout")
            if not normals_where or all(s.row.get(k) == v for k, v in normals_where.items())
        ]
        zfs = [zone_features(load_gray(s.image), lung, opacity) for s in samples]
        normal_feats[Path(folder_n).name] = {
            "fractions": np.array([z.fractions for z in zfs]),
            "mean_prob": np.array([z.mean_prob for z in zfs]),
        }
        log.info("severity rules: %d normals from %s", len(zfs), folder_n)
    summary: dict[str, Any] = {
        "folds": list(folds),
        "reference": "mean of covid_scoring raters",
        "checkpoints": {"lung": str(lung_checkpoint or "shipped"), "opacity": str(opacity_checkpoint or "shipped")},
        "normals_split": str(normals_split or ""),
        "rules": {},
    }
    for spec in RULES:
        result = cross_fit(spec, {f: np.array(v[spec.feature]) for f, v in feats.items()}, ref_arr)
        params = np.array(result["fitted_on_all"])
        on_normals = {name: spec.rule(nf[spec.feature], params) for name, nf in normal_feats.items()}
        result["zones_on_normals_at_fitted_on_all"] = {n: round(float(s.mean()), 4) for n, s in on_normals.items()}
        result["score_counts_on_normals"] = {n: np.bincount(s, minlength=7).tolist() for n, s in on_normals.items()}
        summary["rules"][spec.name] = result
        log.info("severity rules: %-36s cross-fitted MAE %.3f", spec.name, result["cv"]["mae"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary
