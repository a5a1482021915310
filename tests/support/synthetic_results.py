"""Synthetic worker output for result-object tests: geometric masks on the prepared grid and an
AnalyzeResult whose numbers agree with them (what a worker would return, without running a model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from node.analysis.prepare import Prepared, masks_to_source, prepare
from node.results.sr import PriorComparison
from workers.api import AnalyzeResult, ModelInfo, pack_mask

MODELS = [
    ModelInfo("lung", "1.2.0", "a" * 64, "validated", "DeepLabV3+ efficientnet-b1"),
    ModelInfo("opacity", "1.0.1", "b" * 64, "validated", "MAnet resnet18"),
    ModelInfo(
        "pneumothorax",
        "0.3.0",
        "c" * 64,
        "experimental",
        "Unet resnet34",
        performance="5 of 6 held-out pneumothoraces found at 0.9 % false alarms; 27 training positives",
    ),
]

#: A patient's prior study, as node.triage finds it, for SRs that compare against one.
PRIOR = PriorComparison(
    study_instance_uid="1.2.826.0.1.3680043.8.498.1",
    study_date="20261120",
    severity_score=1,
    series_instance_uid="1.2.826.0.1.3680043.8.498.2",
    sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
    sop_instance_uid="1.2.826.0.1.3680043.8.498.3",
)


@dataclass
class Case:
    source: Dataset
    prepared: Prepared
    result: AnalyzeResult
    small: dict[str, np.ndarray]  # masks on the result (prepared) grid
    full: dict[str, np.ndarray]  # masks on the source grid


def synthetic_masks(rows: int, cols: int, pneumothorax: bool = True) -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[:rows, :cols]
    right = ((yy - rows * 0.5) / (rows * 0.3)) ** 2 + ((xx - cols * 0.3) / (cols * 0.15)) ** 2 < 1  # image left
    left = ((yy - rows * 0.5) / (rows * 0.3)) ** 2 + ((xx - cols * 0.7) / (cols * 0.15)) ** 2 < 1
    opacity = right & (yy > rows * 0.55)
    pntx = left & (yy < rows * 0.35) & (xx > cols * 0.75) if pneumothorax else np.zeros((rows, cols), dtype=bool)
    return {"right_lung": right, "left_lung": left, "opacity": opacity, "pneumothorax": pntx}


def synthetic_result(
    rows: int, cols: int, masks: dict[str, np.ndarray], models: list[ModelInfo] | None = None
) -> AnalyzeResult:
    right, left, opacity, pntx = (masks[k] for k in ("right_lung", "left_lung", "opacity", "pneumothorax"))
    return AnalyzeResult(
        job_id="job-1",
        rows=rows,
        cols=cols,
        masks={k: pack_mask(v) for k, v in masks.items()},
        severity_score=2,
        zone_fractions=[0.0, 0.12, 0.61, 0.0, 0.05, 0.4],
        zone_affected=[False, False, True, False, False, True],
        opacity_fraction={"right": round(float((opacity & right).sum() / right.sum()), 4), "left": 0.0},
        lung_area_px={"right": int(right.sum()), "left": int(left.sum())},
        pneumothorax_probability=0.91 if pntx.any() else 0.04,
        pneumothorax_present=bool(pntx.any()),
        pneumothorax_side="left" if pntx.any() else None,
        pneumothorax_area_px=int(pntx.sum()),
        models=list(models or MODELS),
    )


def synthetic_case(path: Path, pneumothorax: bool = True, models: list[ModelInfo] | None = None) -> Case:
    source = pydicom.dcmread(path, force=True)
    prepared = prepare(path)
    small = synthetic_masks(prepared.rows, prepared.cols, pneumothorax)
    result = synthetic_result(prepared.rows, prepared.cols, small, models)
    full = {name: masks_to_source(mask, prepared) for name, mask in small.items()}
    return Case(source, prepared, result, small, full)
