"""Choose among evaluated variants of one model on half of the images, report them on the other half.

Why: an inference-time choice (test-time augmentation, a threshold) made and scored on the same
validation images flatters itself, and the lung validation images already chose the shipped epoch.
Each image goes to the `choose` or the `report` half by a hash of its source and id (stable across
runs and machines); the variant with the best mean of the per-source means on the `choose` half wins,
and only the `report` half's figures say what it buys. Ties (within `tie`) go to the earlier variant,
so list the cheapest first.

Input: `python -m training evaluate` output folders (per_image.csv) scored on the same images.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

HALVES = ("choose", "report")


def half(source: str, image_id: str) -> str:
    """'choose' or 'report', about half each, by the image's source and id."""
    digest = hashlib.sha256(f"{source}/{image_id}".encode()).digest()
    return HALVES[digest[0] & 1]


def read_variant(folder: Path, metric: str) -> dict[tuple[str, str], float]:
    with (Path(folder) / "per_image.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and metric not in rows[0]:
        raise ValueError(f"{folder}: per_image.csv has no column {metric!r} (has {sorted(rows[0])})")
    return {(r["source"], r["id"]): float(r[metric]) for r in rows if r[metric] not in ("", "nan")}


def _block(values: dict[tuple[str, str], float]) -> dict[str, Any]:
    # Five places, where training.evaluate.summarise keeps four: the choice's tie margin is 0.0005.
    by_source: dict[str, list[float]] = {}
    for (source, _), v in values.items():
        by_source.setdefault(source, []).append(v)
    means = {s: float(np.mean(v)) for s, v in sorted(by_source.items())}
    return {
        "n": len(values),
        "images_mean": round(float(np.mean(list(values.values()))), 5) if values else math.nan,
        "source_mean": round(float(np.mean(list(means.values()))), 5) if means else math.nan,
        "by_source": {s: round(m, 5) for s, m in means.items()},
    }


def choose(
    variants: Sequence[Path], metric: str = "dice", lower_is_better: bool = False, tie: float = 0.0005
) -> dict[str, Any]:
    """Per-variant figures on both halves, the variant chosen on `choose`, and its gain on `report`
    over the first variant (the baseline) with the share of report images it improved."""
    if len(variants) < 2:
        raise ValueError("give the baseline and at least one variant")
    scores = {str(v): read_variant(v, metric) for v in variants}
    keys = set.intersection(*(set(s) for s in scores.values()))
    if not keys:
        raise ValueError("the variants share no scored image")
    for name, s in scores.items():
        if set(s) != keys:
            raise ValueError(f"{name}: scored other images than the rest ({len(set(s) ^ keys)} differ)")
    sides = {h: sorted(k for k in keys if half(*k) == h) for h in HALVES}
    table = {
        name: {h: _block({k: s[k] for k in sides[h]}) for h in HALVES} | {"all": _block(s)}
        for name, s in scores.items()
    }
    sign = -1.0 if lower_is_better else 1.0
    names = list(scores)
    best = names[0]
    for name in names[1:]:
        if sign * (table[name]["choose"]["source_mean"] - table[best]["choose"]["source_mean"]) > tie:
            best = name
    base = names[0]
    diffs = np.array([scores[best][k] - scores[base][k] for k in sides["report"]])
    return {
        "metric": metric,
        "lower_is_better": lower_is_better,
        "rule": f"best source_mean on the choose half, ties within {tie} to the earlier variant",
        "halves": {h: len(sides[h]) for h in HALVES},
        "variants": table,
        "chosen": best,
        "baseline": base,
        "report_gain": {
            "source_mean": round(table[best]["report"]["source_mean"] - table[base]["report"]["source_mean"], 5),
            "images_mean": round(float(diffs.mean()), 5) if diffs.size else math.nan,
            "images_better": int((sign * diffs > 0).sum()),
            "images_worse": int((sign * diffs < 0).sum()),
            "by_source": {
                s: round(table[best]["report"]["by_source"][s] - table[base]["report"]["by_source"][s], 5)
                for s in table[base]["report"]["by_source"]
            },
        },
    }
