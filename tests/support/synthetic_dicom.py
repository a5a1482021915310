"""Small DICOM files made from the shared test set, for tests that need many instances."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.support.paths import dicom_dir


def small_chest_copies(out: Path, n: int, per_study: int = 10) -> list[Path]:
    """n small chest CRs (64x64, frontal) with new SOP Instance UIDs, `per_study` instances per study."""
    src = pydicom.dcmread(dicom_dir() / "07_cr_10bit_stored_16alloc.dcm")
    src.Rows = src.Columns = 64
    src.PixelData = bytes(range(256)) * 32  # 64*64 pixels of 2 bytes
    out.mkdir(parents=True)
    paths = []
    for i in range(n):
        if i % per_study == 0:
            src.StudyInstanceUID = generate_uid()
            src.SeriesInstanceUID = generate_uid()
        src.SOPInstanceUID = generate_uid()
        src.file_meta.MediaStorageSOPInstanceUID = src.SOPInstanceUID
        path = out / f"copy{i:03d}.dcm"
        src.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
