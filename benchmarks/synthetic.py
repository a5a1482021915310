"""Synthetic DICOM copies of the shared test files: many distinct instances from one template.

`copies_with_new_uids` is the one place that renumbers a template (tests/support/synthetic_dicom.py
uses it too; benchmarks never import tests/). `chest_crs` makes full-size chest CRs for the ingest
benchmark, generated once into a cache folder: pixels come from the realistic 2048x2500 CR of the
shared test set (centre-cropped to 2048x2048), shifted and overlaid with per-file noise, so no two
files are equal and the data does not compress away.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from benchmarks.common import DICOM_DIR

log = logging.getLogger(__name__)

TEMPLATE = "01_cr_explicit_le_mono2_12bit_2048x2500.dcm"
SIDE = 2048
RECIPE = 1  # bump when the generated files change


def copies_with_new_uids(
    ds: Dataset,
    out: Path,
    n: int,
    *,
    per_study: int = 1,
    name: str = "copy{:03d}.dcm",
    modify: Callable[[Dataset, int], None] | None = None,
) -> list[Path]:
    """`n` files in `out` written from `ds`: new Study and Series Instance UIDs every `per_study` files,
    a new SOP Instance UID each; `modify(ds, i)` changes anything else (pixels, numbers) before file i."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        if i % per_study == 0:
            ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if modify is not None:
            modify(ds, i)
        path = out / name.format(i)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def chest_crs(cache: Path, n: int, side: int = SIDE, per_study: int = 2, seed: int = 0) -> list[Path]:
    """`n` CR files of side x side 16-bit (12 stored) pixels in `cache`; reused when already there."""
    folder = cache / f"cr{side}-{n}-r{RECIPE}"
    stamp = folder / "complete.json"
    if stamp.exists():
        files = sorted(folder.glob("cr*.dcm"))
        if len(files) == n:
            return files
    ds = pydicom.dcmread(DICOM_DIR / TEMPLATE)
    base = ds.pixel_array.astype(np.int32)
    r0 = max(0, (base.shape[0] - side) // 2)
    c0 = max(0, (base.shape[1] - side) // 2)
    base = base[r0 : r0 + side, c0 : c0 + side]
    if base.shape != (side, side):  # smaller template (only in --quick runs with a small side)
        base = np.resize(base, (side, side))
    rng = np.random.default_rng(seed)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0

    def vary(copy: Dataset, i: int) -> None:
        if i % per_study == 0:
            copy.AccessionNumber = f"BENCH{i:06d}"
        copy.InstanceNumber = i + 1
        shifted = np.roll(base, (int(rng.integers(-40, 40)), int(rng.integers(-40, 40))), axis=(0, 1))
        noisy = shifted + rng.integers(-24, 25, size=shifted.shape, dtype=np.int32)
        copy.PixelData = np.clip(noisy, 0, 4095).astype("<u2").tobytes()

    files = copies_with_new_uids(ds, folder, n, per_study=per_study, name="cr{:04d}.dcm", modify=vary)
    stamp.write_text(json.dumps({"n": n, "side": side, "template": TEMPLATE, "recipe": RECIPE}))
    log.info("generated %d synthetic CRs in %s", n, folder)
    return files


def analysable_copies(out: Path, n: int, template: str = "02_cr_implicit_le_12bit.dcm") -> list[Path]:
    """`n` copies of a manifest-analysable CR, one study each (pipeline benchmark)."""
    return copies_with_new_uids(pydicom.dcmread(DICOM_DIR / template), out, n)
