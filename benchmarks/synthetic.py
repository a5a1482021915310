"""Synthetic full-size chest CRs for the ingest benchmark, generated once into a cache folder.

Pixels come from the realistic 2048x2500 CR of the shared test set (centre-cropped to 2048x2048),
shifted and overlaid with per-file noise, so no two files are equal and the data does not compress
away; every file has new Study/Series/SOP Instance UIDs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from benchmarks.common import DICOM_DIR

log = logging.getLogger(__name__)

TEMPLATE = "01_cr_explicit_le_mono2_12bit_2048x2500.dcm"
SIDE = 2048
RECIPE = 1  # bump when the generated files change


def chest_crs(cache: Path, n: int, side: int = SIDE, per_study: int = 2, seed: int = 0) -> list[Path]:
    """`n` CR files of side x side 16-bit (12 stored) pixels in `cache`; reused when already there."""
    folder = cache / f"cr{side}-{n}-r{RECIPE}"
    stamp = folder / "complete.json"
    if stamp.exists():
        files = sorted(folder.glob("cr*.dcm"))
        if len(files) == n:
            return files
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(DICOM_DIR / TEMPLATE)
    base = ds.pixel_array.astype(np.int32)
    r0 = max(0, (base.shape[0] - side) // 2)
    c0 = max(0, (base.shape[1] - side) // 2)
    base = base[r0:r0 + side, c0:c0 + side]
    if base.shape != (side, side):  # smaller template (only in --quick runs with a small side)
        base = np.resize(base, (side, side))
    rng = np.random.default_rng(seed)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    files = []
    for i in range(n):
        if i % per_study == 0:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
            ds.AccessionNumber = f"BENCH{i:06d}"
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        shifted = np.roll(base, (int(rng.integers(-40, 40)), int(rng.integers(-40, 40))), axis=(0, 1))
        noisy = shifted + rng.integers(-24, 25, size=shifted.shape, dtype=np.int32)
        ds.PixelData = np.clip(noisy, 0, 4095).astype("<u2").tobytes()
        path = folder / f"cr{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    stamp.write_text(json.dumps({"n": n, "side": side, "template": TEMPLATE, "recipe": RECIPE}))
    log.info("generated %d synthetic CRs in %s", n, folder)
    return files


def analysable_copies(out: Path, n: int, template: str = "02_cr_implicit_le_12bit.dcm") -> list[Path]:
    """`n` copies of a manifest-analysable CR with new Study/Series/SOP Instance UIDs (pipeline benchmark)."""
    out.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(DICOM_DIR / template)
    files = []
    for i in range(n):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = out / f"copy{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files
