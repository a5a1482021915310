"""K-fold cross-validation of the opacity model's weak training, by the `fold` column of severity/.

For test fold k the weak labels of fold k-1 select the epoch and tune the zone threshold, the other
folds train, and fold k is only predicted (with 5 folds, test fold 4 is the shipped model's own
protocol: folds 0-2 train, fold 3 selects). Every image is predicted once, by the one model that
never saw it, and the pooled predictions give the MAE, kappa and confusion matrix against the raters'
mean. The pixel data (covid_opacity masks, JSRT negatives) is the same in every fold: it carries no
severity labels.

Folds train as separate `python -m training train` processes, `parallel` at a time (one GPU holds
several small runs; on a CPU keep it at 1).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.metrics import severity_agreement
from training.predict import Segmenter
from training.processes import run_processes
from training.severity_eval import best_threshold, constant_baseline_errors, zone_fractions
from training.weak import severity_samples, zone_cache
from workers.models import SPECS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldPlan:
    test: int
    validation: int
    train: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"fold{self.test}"


def plan(folds: int = 5) -> list[FoldPlan]:
    """Test fold k, validation fold k-1 (cyclic), training on the rest."""
    if folds < 3:
        raise ValueError(f"cross-validation needs at least 3 folds (train, validation, test), not {folds}")
    return [
        FoldPlan(k, (k - 1) % folds, tuple(f for f in range(folds) if f not in (k, (k - 1) % folds)))
        for k in range(folds)
    ]


def train_command(p: FoldPlan, run_dir: Path, weak_data: Path, train_args: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "training",
        "train",
        "opacity",
        "--run",
        str(run_dir),
        "--weak-data",
        str(weak_data),
        "--weak-train-folds",
        *map(str, p.train),
        "--weak-val-folds",
        str(p.validation),
        *train_args,
    ]


class FoldTrainingError(RuntimeError):
    """A fold's `train` process failed."""


def run_folds(
    plans: Sequence[FoldPlan],
    root: Path,
    weak_data: Path,
    train_args: Sequence[str],
    parallel: int = 1,
    input_size: int = SPECS["opacity"].input_size,
) -> None:
    """Train every fold (`parallel` processes at a time) into root/fold<k>/, log in train.log there.

    A fold whose run already has best.pt and no `--resume` in `train_args` is not trained again.
    `input_size` must be the one `train_args` train at (the grid of the shared lung zones).
    Raises FoldTrainingError naming the folds whose training failed.
    """
    # The lung zones of every weak image, once, instead of once per fold process.
    zones = root / "zones.npz"
    zone_cache(
        severity_samples(weak_data, sorted({f for p in plans for f in (p.test, p.validation, *p.train)})),
        input_size,
        zones,
    )
    pending = [p for p in plans if "--resume" in train_args or not (root / p.name / "best.pt").exists()]
    commands = []
    for p in pending:
        run_dir = root / p.name
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(zones, run_dir / "zones.npz")
        commands.append((p.name, train_command(p, run_dir, weak_data, train_args), run_dir / "train.log"))
    codes = run_processes(commands, parallel)
    failed = [name for name, code in codes.items() if code != 0]
    if failed:
        raise FoldTrainingError(f"training failed for {failed}: see train.log in their run folders under {root}")


def evaluate_folds(plans: Sequence[FoldPlan], root: Path, weak_data: Path, lung: Segmenter) -> dict[str, Any]:
    """Each fold's best.pt on its validation fold (zone threshold) and its test fold (predictions);
    the summary pools all test folds. Writes the predictions to root/cv_predictions.json."""
    per_fold: dict[str, Any] = {}
    predictions: list[dict[str, Any]] = []
    for p in plans:
        opacity = Segmenter.load("opacity", checkpoint=root / p.name / "best.pt")
        rows = zone_fractions(weak_data, root / p.name / "eval", lung, opacity, folds=[p.validation, p.test])
        val = [r for r in rows if r["fold"] == p.validation and r["reference"] is not None]
        test = [r for r in rows if r["fold"] == p.test and r["reference"] is not None]
        if not val or not test:
            raise ValueError(f"{p.name}: no scored images in validation fold {p.validation} or test fold {p.test}")
        _, zone_threshold = best_threshold(val)
        for r in test:
            predictions.append(
                {
                    "image_id": r["image_id"],
                    "fold": p.test,
                    "reference": r["reference"],
                    "score": int(sum(f > zone_threshold for f in r["fractions"])),
                    "zone_threshold": zone_threshold,
                }
            )
        fold_preds = [x for x in predictions if x["fold"] == p.test]
        agreement = severity_agreement([x["reference"] for x in fold_preds], [x["score"] for x in fold_preds])
        history = json.loads((root / p.name / "history.json").read_text())
        best_epoch = max(history, key=lambda h: h.get("val_select", -math.inf))
        per_fold[p.name] = {
            "test_fold": p.test,
            "validation_fold": p.validation,
            "train_folds": list(p.train),
            "zone_threshold": zone_threshold,
            "n": len(fold_preds),
            "mae": round(float(agreement["mae"]), 4),  # type: ignore[arg-type]
            "epochs": len(history),
            "best_epoch": best_epoch["epoch"],
            "train_minutes": round(sum(h["seconds"] for h in history) / 60, 1),
        }
    refs = [x["reference"] for x in predictions]
    pooled = severity_agreement(refs, [x["score"] for x in predictions])
    baseline = constant_baseline_errors(predictions) if len(plans) > 1 else []
    summary = {
        "protocol": "test fold k; fold k-1 selects the epoch and tunes the zone threshold; the rest train",
        "reference": "mean of covid_scoring raters score_r/score_d (one where only one)",
        "data": str(weak_data),
        "cv": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in pooled.items()},
        "baseline_constant_mae": round(float(np.mean(baseline)), 4) if baseline else None,
        "per_fold": per_fold,
    }
    (root / "cv_predictions.json").write_text(json.dumps(predictions, indent=1) + "\n")
    log.info(
        "cross-validation: MAE %.3f over %d images (constant baseline %s), kappa %.3f",
        pooled["mae"],
        len(predictions),
        summary["baseline_constant_mae"],
        pooled["kappa"],
    )
    return summary
