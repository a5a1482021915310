"""SIIM-ACR 2019 run-length masks.

Format (train-rle.csv, columns `ImageId, EncodedPixels`): pixel positions in COLUMN-major (Fortran)
order of a 1024x1024 image, as "start length" pairs where every start is RELATIVE to the end of the
previous run; "-1" means no pneumothorax; an image may have several rows (one per component), OR-ed.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np

SIIM_SIZE = (1024, 1024)
NO_MASK = "-1"


def decode(rle: str, shape: tuple[int, int] = SIIM_SIZE) -> np.ndarray:
    """Boolean mask of `shape` (rows, cols) from one SIIM RLE string."""
    flat = np.zeros(shape[0] * shape[1], dtype=bool)
    text = rle.strip()
    if text in ("", NO_MASK):
        return flat.reshape(shape, order="F")
    values = [int(v) for v in text.split()]
    if len(values) % 2:
        raise ValueError(f"RLE has an odd number of values ({len(values)})")
    pos = 0
    for start, length in zip(values[0::2], values[1::2], strict=True):
        pos += start
        if start < 0 or length < 0 or pos + length > flat.size:
            raise ValueError(f"RLE run {start} {length} is outside a {shape} image")
        flat[pos : pos + length] = True
        pos += length
    return flat.reshape(shape, order="F")


def encode(mask: np.ndarray) -> str:
    """SIIM RLE string of a boolean mask ("-1" when empty); decode(encode(m)) == m."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if not flat.any():
        return NO_MASK
    padded = np.concatenate([[False], flat, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = changes[0::2], changes[1::2]
    out = []
    prev_end = 0
    for s, e in zip(starts, ends, strict=True):
        out += [str(int(s - prev_end)), str(int(e - s))]
        prev_end = int(e)
    return " ".join(out)


def read_csv(path: Path, shape: tuple[int, int] = SIIM_SIZE) -> dict[str, np.ndarray]:
    """ImageId -> mask (rows of one image OR-ed) from a SIIM train-rle.csv."""
    masks: dict[str, np.ndarray] = {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        if len(header) < 2:
            raise ValueError(f"{path}: expected columns ImageId, EncodedPixels; got {header}")
        for row in reader:
            if not row:
                continue
            image_id, rle = row[0].strip(), row[1]
            mask = decode(rle, shape)
            masks[image_id] = masks[image_id] | mask if image_id in masks else mask
    return masks


def write_csv(path: Path, masks: Iterable[tuple[str, np.ndarray]]) -> None:
    """One row per connected run set per image, like the SIIM file (one row per image here)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "EncodedPixels"])
        for image_id, mask in masks:
            w.writerow([image_id, encode(mask)])
