"""Small DICOM files made from the shared test set, for tests that need many instances."""

from __future__ import annotations

from pathlib import Path

import pydicom

from benchmarks.synthetic import copies_with_new_uids
from tests.support.paths import dicom_dir


def small_chest_copies(out: Path, n: int, per_study: int = 10) -> list[Path]:
    """n small chest CRs (64x64, frontal) with new SOP Instance UIDs, `per_study` instances per study."""
    src = pydicom.dcmread(dicom_dir() / "07_cr_10bit_stored_16alloc.dcm")
    src.Rows = src.Columns = 64
    src.PixelData = bytes(range(256)) * 32  # 64*64 pixels of 2 bytes
    return copies_with_new_uids(src, out, n, per_study=per_study)
