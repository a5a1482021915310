"""Weak supervision of the opacity model from severity scores (severity/labels.csv: no pixel masks).

The worker scores severity by counting the lung zones whose opacity fraction exceeds a threshold
(workers.severity). The weak loss trains the opacity model through that same rule, made soft:

- zone fraction f = sum(p * zone) / sum(zone) over the lung zones of the shipped lung model's mask
  (computed once per image and augmented with it);
- a zone is softly affected by a = sigmoid((f - ZONE_THRESHOLD) / TEMPERATURE);
- Brixia zone scores: binary cross-entropy of a against 0 (score 0), 0.5 (score 1) or 1 (2-3). On
  the 89 images with both kinds of label, "Brixia >= 1 = affected" counts 4.8 zones where the raters'
  mean is 3.9 (MAE 1.10); counting a Brixia 1 as half a zone matches them best (MAE 0.76; >= 2 only:
  1.30). Training on ">= 1" made the model over-call against the raters;
- covid_scoring 0-6 scores (mean of the raters): smooth L1 between sum(a) and the score.

Images of the folds held out for validation and test never enter training (`fold` column: patients
are already grouped by fold).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from training.data import Cached, Sample, image_path_of, load_gray, read_rows, resize_mask
from training.predict import Segmenter
from training.severity_eval import brixia_scores, rater_mean
from workers import severity

log = logging.getLogger(__name__)

#: Zone fraction at which the soft rule calls a zone half-affected during training (the shipped zone
#: threshold is tuned afterwards on validation folds, by `python -m training evaluate severity`).
ZONE_THRESHOLD = 0.5
TEMPERATURE = 0.05
BRIXIA_TARGET = {0: 0.0, 1: 0.5, 2: 1.0}  # zone score (2 and 3 alike) -> soft "affected" target


def severity_samples(folder: Path, folds: Sequence[int]) -> list[Sample]:
    """Weakly labelled samples of the given folds: Brixia zones and/or the raters' mean score."""
    folder = Path(folder)
    samples = []
    for row in read_rows(folder):
        if int(row["fold"]) not in folds:
            continue
        zone_target = tuple(math.nan if b is None else BRIXIA_TARGET[min(int(b), 2)] for b in brixia_scores(row))
        score = rater_mean(row)
        if score is None and all(math.isnan(z) for z in zone_target):
            continue
        image_id = row.get("image_id") or row["id"]
        samples.append(
            Sample(
                folder.name,
                image_id,
                image_path_of(folder, row),
                {"opacity": None},
                row.get("patient_id") or f"{folder.name}:{image_id}",
                row=row,
                pixel_labels=False,
                zone_target=zone_target,
                score=score,
            )
        )
    log.info("%s: %d weakly labelled samples in folds %s", folder, len(samples), list(folds))
    return samples


def zone_maps(image: np.ndarray, lung: Segmenter, size: int) -> np.ndarray:
    """uint8 6 x size x size: the worker's six lung zones of `image`, resized to the training grid."""
    right, left = severity.split_lungs(lung.mask(image))
    zones = [z for side in (right, left) for z in severity.zone_masks(side)]
    return np.stack([resize_mask(z, size) for z in zones]).astype(np.uint8)


def zone_cache(samples: Sequence[Sample], size: int, cache_file: Path) -> dict[str, np.ndarray]:
    """Lung zones (6 x size x size) of each weak sample by image id, from the shipped lung model;
    kept in `cache_file` so that the lung model runs once per image and grid size."""
    stored: dict[str, np.ndarray] = {}
    if cache_file.exists():
        with np.load(cache_file) as npz:
            stored = {k: npz[k] for k in npz.files}
    missing = [s for s in samples if not s.pixel_labels and (s.id not in stored or stored[s.id].shape[-1] != size)]
    if missing:
        lung = Segmenter.load("lung")
        with torch.no_grad():
            for i, s in enumerate(missing):
                stored[s.id] = zone_maps(load_gray(s.image), lung, size)
                if (i + 1) % 50 == 0:
                    log.info("lung zones: %d/%d images", i + 1, len(missing))
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache_file, **stored)  # type: ignore[arg-type]  # numpy stub: **kwds arrays
    return stored


def attach_zones(cached: Sequence[Cached], samples: Sequence[Sample], size: int, cache_file: Path) -> None:
    """Fill `zones` of the weak samples from the shipped lung model (cached in `cache_file`)."""
    weak = [(c, s) for c, s in zip(cached, samples, strict=True) if not s.pixel_labels]
    if not weak:
        return
    stored = zone_cache([s for _, s in weak], size, cache_file)
    for c, s in weak:
        c.zones = stored[s.id]


def soft_zone_fractions(prob: torch.Tensor, zones: torch.Tensor) -> torch.Tensor:
    """(B, 6) opacity fraction of each zone; prob (B,1,S,S), zones (B,6,S,S) 0/1. Empty zones give 0."""
    zones = zones.float()
    area = zones.sum((2, 3))
    return (prob * zones).sum((2, 3)) / area.clamp_min(1.0)


def zone_loss(
    logits: torch.Tensor, zones: torch.Tensor, zone_target: torch.Tensor, score: torch.Tensor
) -> torch.Tensor:
    """Mean weak loss over the samples that have weak labels (0 when a batch has none)."""
    prob = torch.sigmoid(logits[:, :1])
    affected = torch.sigmoid((soft_zone_fractions(prob, zones) - ZONE_THRESHOLD) / TEMPERATURE)
    nonempty = zones.sum((2, 3)) > 0
    known = ~torch.isnan(zone_target) & nonempty
    terms = []
    if known.any():
        target = torch.nan_to_num(zone_target)
        bce = F.binary_cross_entropy(affected.clamp(1e-6, 1 - 1e-6), target, reduction="none")
        terms.append((bce * known).sum() / known.sum())
    has_score = ~torch.isnan(score) & nonempty.any(1)
    if has_score.any():
        count = (affected * nonempty).sum(1)
        terms.append(F.smooth_l1_loss(count[has_score], score[has_score], reduction="mean", beta=0.5))
    if not terms:
        return logits.sum() * 0.0
    return torch.stack(terms).sum()


def hard_fractions(prob: torch.Tensor, zones: torch.Tensor, pixel_threshold: float = 0.5) -> torch.Tensor:
    """(B, 6) zone fractions of the thresholded mask, as the worker measures them (on the training grid)."""
    return soft_zone_fractions((prob[:, :1] > pixel_threshold).float(), zones)
