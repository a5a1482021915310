"""Data sets a PACS accepts but that break preparation (issue 13, finding 4): each is well formed enough
to be stored (0x0000), and each must end `failed` with a reason instead of being retried for ever."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from tests.support.paths import dicom_dir


def _small_cr() -> Dataset:
    ds = pydicom.dcmread(dicom_dir() / "07_cr_10bit_stored_16alloc.dcm")
    ds.Rows = ds.Columns = 64
    ds.PixelData = bytes(range(256)) * 32  # 64*64 pixels of 2 bytes
    return ds


def _with_new_uids(ds: Dataset) -> Dataset:
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    return ds


def poison_files(out: Path) -> dict[str, Path]:
    """name -> file: WindowCenter "abc" (LO), an empty VOI LUT item, RescaleSlope as text, an odd-length
    PixelPaddingValue, undecodable (JPEG 2000) pixel data."""
    out.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Dataset] = {}
    ds = _small_cr()
    ds.add_new(0x00281050, "LO", "abc")  # WindowCenter, VR DS in the dictionary, sent as LO text
    ds.add_new(0x00281051, "DS", "400")
    cases["window_center_abc"] = ds
    ds = _small_cr()
    ds.VOILUTSequence = Sequence([Dataset()])
    cases["empty_voi_lut_item"] = ds
    ds = _small_cr()
    ds.add_new(0x00281053, "LO", "two")  # RescaleSlope as text
    ds.add_new(0x00281052, "DS", "0")
    cases["rescale_slope_text"] = ds
    ds = _small_cr()
    ds.add_new(0x00280120, "OB", b"\x00\x01\x02")  # PixelPaddingValue: 3 bytes (padded to 4 on the wire)
    cases["odd_pixel_padding_value"] = ds
    ds = pydicom.dcmread(dicom_dir() / "17_cr_j2k_lossless_12bit.dcm")
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + os.urandom(2000)])  # SOC + SIZ marker, then noise
    cases["undecodable_pixel_data"] = ds
    files = {}
    for name, ds in cases.items():
        path = out / f"{name}.dcm"
        _with_new_uids(ds).save_as(path, enforce_file_format=True)
        files[name] = path
    return files
