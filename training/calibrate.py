"""Pneumothorax presence: a threshold for a stated false-alarm rate, scored on images kept apart.

The worker calls a pneumothorax when the presence head's probability is above the card's
`presence_threshold`. That probability is not calibrated (0.5 was a default), and a triage node is
judged first by how often it raises a false alarm, so the threshold is chosen for a target
false-alarm rate on negatives (Neyman-Pearson): the lowest threshold at which at most
floor(target x n) calibration negatives of *each* source are above it (a source's own rate, because
the finding must not follow the image's origin). Only negatives choose it; positives never do.

Every image the model trained on (the `train` side of the given `split.json` files) is left out;
the rest is divided into two disjoint roles (`assign_role`):
- calibration: negatives that choose the threshold;
- test: where sensitivity, false alarms and Dice on positives are reported, per source.
Folders with a `source_split` column (COVID-QU-Ex) are divided by it: its `Train` folder calibrates,
`Val` tests (folder-disjoint; COVID-QU-Ex has no patient ids). Other folders by a hash of the
patient key (patient-disjoint). Every unseen positive is a test image: there are too few to spend
any, and the threshold does not read them. Groups named in `report_only` (default: the Non-COVID
pneumonias of covid_opacity_negatives, never reviewed for pneumothorax) are test images reported
on their own, outside the headline false-alarm rate.

All positives in shared/ come from one collection (SIIM-ACR, NIH ChestX-ray14), and every negative
from others: the per-source figures show whether presence follows the source.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.data import Sample, load_gray, load_mask, read_folder
from training.metrics import dice
from training.splits import read_split

log = logging.getLogger(__name__)

STRUCTURE = "pneumothorax"
DEFAULT_REPORT_ONLY = ("covid_opacity_negatives:Non-COVID",)
DECIMALS = 4  # the card's threshold, rounded up so that rounding never adds a false alarm
SCALE: int = 10**DECIMALS


def group(sample: Sample) -> str:
    """The source a figure is reported for: the folder, and its `class` where it has one."""
    cls = sample.row.get("class")
    return f"{sample.source}:{cls}" if cls else sample.source


def _hash_fraction(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / 16**12


def assign_role(
    sample: Sample,
    positive: bool,
    trained: set[str],
    report_only: Iterable[str] = DEFAULT_REPORT_ONLY,
    calibration_fraction: float = 0.5,
) -> str | None:
    """ "calibration", "test", or None for an image the model trained on."""
    if f"{sample.source}/{sample.id}" in trained:
        return None
    if positive or group(sample) in set(report_only):
        return "test"
    folder_split = sample.row.get("source_split")
    if folder_split:
        return "calibration" if folder_split == "Train" else "test"
    return (
        "calibration" if _hash_fraction(f"cxr-ptx-calibration-v1|{sample.patient}") < calibration_fraction else "test"
    )


def threshold_for_false_alarm_rate(negative_probs: Sequence[float], target: float) -> float:
    """Lowest threshold t (rounded up to DECIMALS) with at most floor(target x n) of the negatives
    above it (the worker's rule is `probability > t`)."""
    if not negative_probs:
        raise ValueError("no calibration negatives")
    if not 0 <= target < 1:
        raise ValueError(f"target false-alarm rate {target} not in [0, 1)")
    probs = sorted(negative_probs, reverse=True)
    allowed = math.floor(target * len(probs) + 1e-9)
    t = math.ceil(probs[allowed] * SCALE) / SCALE
    while sum(p > t for p in probs) > allowed:  # float rounding; never taken in practice
        t += 1 / SCALE
    return round(t, DECIMALS)


def calibrate(rows: Sequence[Mapping[str, Any]], target: float) -> dict[str, Any]:
    """The threshold that keeps every calibration source at or below `target` (the highest of the
    per-source thresholds), each source's own one, and the pooled one for comparison."""
    cal = [r for r in rows if r["role"] == "calibration" and not r["truth_present"]]
    groups = sorted({r["group"] for r in cal})
    per_source = {
        g: threshold_for_false_alarm_rate([r["presence_prob"] for r in cal if r["group"] == g], target) for g in groups
    }
    if not per_source:
        raise ValueError("no calibration negatives")
    return {
        "target_false_alarm_rate": target,
        "threshold": max(per_source.values()),
        "rule": "highest of the per-source thresholds: at most floor(target x n) calibration negatives of each "
        "source above it",
        "per_source": per_source,
        "pooled": threshold_for_false_alarm_rate([r["presence_prob"] for r in cal], target),
        "n_by_source": {g: sum(r["group"] == g for r in cal) for g in groups},
    }


def count_by_source(
    rows: Sequence[Mapping[str, Any]], threshold: float, report_only: Iterable[str] = DEFAULT_REPORT_ONLY
) -> dict[str, Any]:
    """Presence at `threshold` per source: positives found (sensitivity), negatives above it (false
    alarms), Dice on positives (the worker reports no mask when presence is not called, Dice 0).
    `overall` pools every source outside `report_only`."""

    def block(rs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        pos = [r for r in rs if r["truth_present"]]
        neg = [r for r in rs if not r["truth_present"]]
        out: dict[str, Any] = {"n": len(rs)}
        if pos:
            found = [r for r in pos if r["presence_prob"] > threshold]
            dices = [float(r["dice_raw"]) if r["presence_prob"] > threshold else 0.0 for r in pos]
            out |= {
                "positives": len(pos),
                "found": len(found),
                "sensitivity": round(len(found) / len(pos), 4),
                "dice_positives": round(float(np.mean(dices)), 4),
                "dice_positives_median": round(float(np.median(dices)), 4),
            }
        if neg:
            alarms = sum(r["presence_prob"] > threshold for r in neg)
            out |= {"negatives": len(neg), "false_alarms": alarms, "false_alarm_rate": round(alarms / len(neg), 4)}
        return out

    skip = set(report_only)
    groups = sorted({r["group"] for r in rows})
    return {
        "threshold": threshold,
        "overall": block([r for r in rows if r["group"] not in skip]),
        "by_source": {g: block([r for r in rows if r["group"] == g]) for g in groups},
        "report_only": sorted(skip & set(groups)),
    }


def auc(positive_probs: Sequence[float], negative_probs: Sequence[float]) -> float:
    """Share of (positive, negative) pairs the presence probability ranks right (ties count half):
    how well it separates, whatever the threshold."""
    if not positive_probs or not negative_probs:
        return math.nan
    neg = np.sort(np.asarray(negative_probs, float))
    pos = np.asarray(positive_probs, float)
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(pos) * len(neg)))


def auc_by_source(
    rows: Sequence[Mapping[str, Any]], report_only: Iterable[str] = DEFAULT_REPORT_ONLY
) -> dict[str, float]:
    """AUC of all the positives against each negative source, and against every source outside
    `report_only` (`overall`)."""
    skip = set(report_only)
    pos = [r["presence_prob"] for r in rows if r["truth_present"]]
    neg = [r for r in rows if not r["truth_present"]]
    out = {"overall": round(auc(pos, [r["presence_prob"] for r in neg if r["group"] not in skip]), 4)}
    for g in sorted({r["group"] for r in neg}):
        out[g] = round(auc(pos, [r["presence_prob"] for r in neg if r["group"] == g]), 4)
    return out


def _capped(samples: list[tuple[Sample, bool, str]], max_per_group: int) -> list[tuple[Sample, bool, str]]:
    """At most `max_per_group` images per (group, role), chosen by a hash (not file order)."""
    if not max_per_group:
        return samples
    ordered = sorted(samples, key=lambda t: _hash_fraction(f"cxr-ptx-cap-v1|{t[0].source}/{t[0].id}"))
    counts: dict[tuple[str, str], int] = {}
    kept = []
    for sample, positive, role in ordered:
        key = (group(sample), role)
        counts[key] = counts.get(key, 0) + 1
        if positive or counts[key] <= max_per_group:
            kept.append((sample, positive, role))
    return kept


def collect(
    data: Sequence[Path],
    negatives: Sequence[Path],
    split_files: Sequence[Path],
    report_only: Iterable[str] = DEFAULT_REPORT_ONLY,
    max_per_group: int = 0,
) -> list[tuple[Sample, bool, str]]:
    """(sample, positive, role) of every image none of the split files trained on."""
    trained: set[str] = set()
    for f in split_files:
        trained |= read_split(f)["train"]
    found = [(s, True) for f in data for s in read_folder(Path(f), (STRUCTURE,))]
    found += [(s, False) for f in negatives for s in read_folder(Path(f), (STRUCTURE,), negative=True)]
    chosen = []
    for sample, positive in found:
        role = assign_role(sample, positive, trained, report_only)
        if role is not None:
            chosen.append((sample, positive, role))
    return _capped(chosen, max_per_group)


def calibrate_presence(
    data: Sequence[Path],
    negatives: Sequence[Path],
    out_dir: Path,
    *,
    split_files: Sequence[Path] = (),
    target: float = 0.02,
    weights_dir: Path | None = None,
    checkpoint: Path | None = None,
    report_only: Sequence[str] = DEFAULT_REPORT_ONLY,
    max_per_group: int = 0,
    compare: Sequence[float] = (),
    tta_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Predict every unseen image, choose the threshold on the calibration negatives, score the test
    images at it (and at the card's threshold and any in `compare`): `per_image.csv`, `summary.json`."""
    from training.predict import load_model, predict
    from workers.tta import card_transforms

    model, spec, card = load_model(STRUCTURE, weights_dir, checkpoint)
    transforms = card_transforms(card, tta_names)
    pixel_thr = float(card.get("threshold", 0.5))
    card_presence = float(card.get("presence_threshold", 0.5))
    items = collect(data, negatives, split_files, report_only, max_per_group)
    if not items:
        raise ValueError("no images left after removing those the model trained on")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for i, (s, positive, role) in enumerate(items):
        image = load_gray(s.image)
        prob, presence = predict(model, spec, image, transforms)
        if presence is None:
            raise ValueError(f"{spec.name}: the model has no presence head")
        row: dict[str, Any] = {
            "group": group(s),
            "id": s.id,
            "role": role,
            "truth_present": int(positive),
            "presence_prob": round(presence, 6),
        }
        if positive:
            row["dice_raw"] = round(dice(prob[0] > pixel_thr, load_mask(s.masks[STRUCTURE], image.shape)), 5)
        rows.append(row)
        if (i + 1) % 100 == 0:
            log.info("predicted %d/%d", i + 1, len(items))
    calibration = calibrate(rows, target)
    test = [r for r in rows if r["role"] == "test"]
    summary: dict[str, Any] = {
        "model": STRUCTURE,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "weights_sha256": card.get("sha256"),
        "tta": [t.name for t in transforms],
        "pixel_threshold": pixel_thr,
        "data": [str(f) for f in data],
        "negatives": [str(f) for f in negatives],
        "trained_on_splits": [str(f) for f in split_files],
        "max_per_group": max_per_group,
        "roles": {
            role: {
                g: sum(1 for r in rows if r["role"] == role and r["group"] == g)
                for g in sorted({r["group"] for r in rows if r["role"] == role})
            }
            for role in ("calibration", "test")
        },
        "calibration": calibration,
        "test": count_by_source(test, calibration["threshold"], report_only),
        "test_at": {str(t): count_by_source(test, t, report_only) for t in sorted({card_presence, *compare})},
        "card_presence_threshold": card_presence,
        "test_auc": auc_by_source(test, report_only),
    }
    with open(out_dir / "per_image.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["group", "id", "role", "truth_present", "presence_prob", "dice_raw"])
        w.writeheader()
        w.writerows(rows)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    log.info(
        "threshold %.4f for %.1f %% false alarms; test: %s",
        calibration["threshold"],
        100 * target,
        json.dumps(summary["test"]["overall"]),
    )
    return summary
