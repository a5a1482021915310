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


def ybr_full_422_copy(out: Path) -> Path:
    """The RGB chest capture of the test set as uncompressed YBR_FULL_422 (one Cb/Cr per two pixels: the
    Pixel Data is two thirds of the RGB size), with a new SOP Instance UID."""
    import numpy as np
    from pydicom.pixels import convert_color_space
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(dicom_dir() / "23_sc_chest_rgb_annotated.dcm")
    ybr = convert_color_space(ds.pixel_array, "RGB", "YBR_FULL")
    rows, cols, _ = ybr.shape
    packed = np.empty((rows, cols // 2, 4), np.uint8)  # Y1 Y2 Cb Cr for each pair of pixels
    packed[..., 0], packed[..., 1] = ybr[:, 0::2, 0], ybr[:, 1::2, 0]
    for i, channel in ((2, 1), (3, 2)):
        packed[..., i] = ybr[..., channel].reshape(rows, cols // 2, 2).mean(axis=2).astype(np.uint8)
    ds.PixelData = packed.tobytes()
    ds.PhotometricInterpretation, ds.PlanarConfiguration = "YBR_FULL_422", 0
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def padded_pixel_data_copy(source: Path, out: Path, excess: int) -> Path:
    """A copy of `source` (native Pixel Data) with `excess` bytes appended to its Pixel Data (as some
    writers pad it), with a new SOP Instance UID."""
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    ds.PixelData = ds.PixelData + bytes(excess)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out
