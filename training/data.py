"""Datasets in the shared folder format: `index.csv` (or `labels.csv`) + `images/` + `masks/<structure>/`.

Any number of folders can be combined. Images are decoded once and kept resized to the model's input
size (uint8) so that an epoch on two CPU cores is spent in the network, not in PNG decoding. The
resize is the same PIL bilinear resize as `workers.models.preprocess`, and `to_tensor` applies the
same normalisation, so a sample without augmentation is exactly what the worker feeds the model.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IGNORE = "ignore"  # masks/ignore: pixels excluded from the loss and the metrics (devices, markup)


@dataclass(frozen=True)
class Sample:
    """One image of a shared-format folder."""

    source: str  # folder name, e.g. "jsrt", "darwin_covid", "covid_opacity"
    id: str
    image: Path
    masks: dict[str, Path | None]  # structure -> mask file; None = known negative (all-zero mask)
    patient: str  # patient key for splits; the image id where the folder has no patient ids
    ignore: Path | None = None
    row: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    # Weak labels (severity/ images: no pixel masks). `pixel_labels=False` excludes every pixel from
    # the pixel loss; `zone_target` holds six 0/1 zone labels (NaN = unknown), `score` a 0-6 count.
    pixel_labels: bool = True
    zone_target: tuple[float, ...] = ()
    score: float | None = None
    # Per-lung RALO geographic extent (severity_ralo/, training.ralo; a 0-4 scale per lung, never the
    # 0-6 score): `extent_bounds` = right lo, right hi, left lo, left hi fraction of the lung;
    # `extent_score` = the raters' mean extent of the right and left lung.
    extent_bounds: tuple[float, ...] = ()
    extent_score: tuple[float, ...] = ()


def index_file(folder: Path) -> Path:
    for name in ("index.csv", "labels.csv"):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(f"{folder}: no index.csv or labels.csv (not a shared-format folder)")


def read_rows(folder: Path) -> list[dict[str, str]]:
    with open(index_file(folder), newline="") as f:
        return list(csv.DictReader(f))


def row_id(row: dict[str, str]) -> str:
    return row.get("id") or row["image_id"]


def image_path_of(folder: Path, row: dict[str, str]) -> Path:
    rel = row.get("image_path")
    return folder / rel if rel else folder / "images" / f"{row_id(row)}.png"


def read_folder(
    folder: Path, structures: Sequence[str], *, negative: bool = False, require_masks: bool = True
) -> list[Sample]:
    """Samples of `folder` that have every structure in `structures`.

    `negative=True` declares the folder free of those structures (e.g. JSRT for pneumothorax): its
    images become samples with all-zero masks.
    """
    folder = Path(folder)
    source = folder.name
    samples = []
    skipped = 0
    for row in read_rows(folder):
        sid = row_id(row)
        masks: dict[str, Path | None] = {}
        for s in structures:
            path = folder / "masks" / s / f"{sid}.png"
            if negative:
                masks[s] = None
            elif path.exists():
                masks[s] = path
        if require_masks and len(masks) < len(structures):
            skipped += 1
            continue
        ignore = folder / "masks" / IGNORE / f"{sid}.png"
        patient = (row.get("patient_id") or "").strip() or f"{source}:{sid}"
        samples.append(
            Sample(source, sid, image_path_of(folder, row), masks, patient, ignore if ignore.exists() else None, row)
        )
    if skipped:
        log.info("%s: %d images lack a %s mask and are skipped", folder, skipped, "/".join(structures))
    log.info("%s: %d samples", folder, len(samples))
    return samples


def read_folders(folders: Iterable[Path], structures: Sequence[str]) -> list[Sample]:
    return [s for f in folders for s in read_folder(Path(f), structures)]


def load_gray(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def load_mask(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask; None (a declared negative) gives all zeros of `shape`."""
    if path is None:
        return np.zeros(shape, dtype=bool)
    mask = np.asarray(Image.open(path).convert("L")) > 127
    if mask.shape != shape:
        raise ValueError(f"{path}: mask {mask.shape} does not match its image {shape}")
    return mask


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """The uint8 resize of `workers.models.preprocess` (PIL bilinear to size x size)."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)) > 127


def normalise(image: np.ndarray) -> np.ndarray:
    """uint8 SxS -> float32, the normalisation of `workers.models.preprocess`."""
    return (image.astype(np.float32) / 255.0 - 0.5) / 0.25


ZONES = 6  # RU, RM, RL, LU, LM, LL (workers.severity)


@dataclass
class Cached:
    image: np.ndarray  # uint8 SxS
    target: np.ndarray  # uint8 CxSxS, 0/1
    valid: np.ndarray  # uint8 SxS, 0 where masks/ignore marks pixels (all 0 without pixel labels)
    positive: float  # 1.0 if any target pixel (presence label)
    zones: np.ndarray | None = None  # uint8 6xSxS lung zones, for weak labels (training.weak)
    zone_target: np.ndarray = field(default_factory=lambda: np.full(ZONES, np.nan, np.float32))
    score: float = math.nan  # 0-6 severity reference; NaN = none
    extent_bounds: np.ndarray = field(default_factory=lambda: np.full(4, np.nan, np.float32))  # training.ralo
    extent_score: np.ndarray = field(default_factory=lambda: np.full(2, np.nan, np.float32))


def cache_samples(samples: Sequence[Sample], structures: Sequence[str], size: int) -> list[Cached]:
    out = []
    for i, s in enumerate(samples):
        image = load_gray(s.image)
        masks = [load_mask(s.masks.get(st), image.shape) for st in structures]
        if not s.pixel_labels:
            valid = np.zeros(image.shape, bool)
        elif s.ignore:
            valid = ~load_mask(s.ignore, image.shape)
        else:
            valid = np.ones(image.shape, bool)
        target = np.stack([resize_mask(m, size) for m in masks]).astype(np.uint8)
        zone_target = np.array(s.zone_target or [math.nan] * ZONES, np.float32)
        out.append(
            Cached(
                resize_image(image, size),
                target,
                resize_mask(valid, size).astype(np.uint8),
                float(any(m.any() for m in masks)),
                zone_target=zone_target,
                score=math.nan if s.score is None else s.score,
                extent_bounds=np.array(s.extent_bounds or [math.nan] * 4, np.float32),
                extent_score=np.array(s.extent_score or [math.nan] * 2, np.float32),
            )
        )
        if (i + 1) % 200 == 0:
            log.info("cached %d/%d images", i + 1, len(samples))
    return out


Augment = Callable[..., dict[str, np.ndarray]]


Item = dict[str, np.ndarray | np.float32]


class SegmentationDataset:
    """torch-style dataset over cached samples; an item is a dict of arrays that the default collate
    stacks: x (1xSxS), target (CxSxS), valid (1xSxS), positive, zones (6xSxS uint8), zone_target (6),
    score, extent_bounds (4) and extent_score (2) (training.ralo).
    """

    def __init__(self, cached: Sequence[Cached], augment: Augment | None = None) -> None:
        self.cached = list(cached)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.cached)

    def __getitem__(self, i: int) -> Item:
        c = self.cached[i]
        image, target, valid = c.image, c.target, c.valid
        zones = c.zones if c.zones is not None else np.zeros((ZONES, *image.shape), np.uint8)
        if self.augment is not None:
            # Zones move with the image: the weak labels belong to the anatomy, not to the grid.
            extra = list(zones) if c.zones is not None else []
            out = self.augment(image=image, masks=[*target, valid, *extra])
            image = out["image"]
            masks = list(out["masks"])
            target = np.stack(masks[: len(target)])
            valid = masks[len(target)]
            if extra:
                zones = np.stack(masks[len(target) + 1 :])
        return {
            "x": normalise(image)[None],
            "target": target.astype(np.float32),
            "valid": np.asarray(valid, np.float32)[None],
            "positive": np.float32(c.positive),
            "zones": np.asarray(zones, np.uint8),
            "zone_target": c.zone_target,
            "score": np.float32(c.score),
            "extent_bounds": c.extent_bounds,
            "extent_score": c.extent_score,
        }
