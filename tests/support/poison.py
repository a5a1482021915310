"""Hostile data sets for issue 13: poison values that break preparation (finding 4: stored, then `failed`
with a reason instead of retried for ever) and decompression bombs (finding 1)."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

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


def j2k_bomb(out: Path, *, rows_cols: int | None = None, side: int = 12000) -> Path:
    """A ~3 kB JPEG 2000 data set whose codestream declares `side` x `side` pixels (issue 13, finding 1).

    Rows/Columns say `rows_cols` (default: `side` as well, so only the decoded-size cap can stop it)."""
    ds = pydicom.dcmread(dicom_dir() / "17_cr_j2k_lossless_12bit.dcm")
    code = bytearray(next(_frames(ds))[:3000])
    at = code.find(b"\xff\x4f\xff\x51")
    struct.pack_into(">LL", code, at + 8, side, side)  # Xsiz, Ysiz of the SIZ marker
    code += b"\xff\xd9"  # end of codestream
    ds.PixelData = encapsulate([bytes(code)])
    ds.Rows = ds.Columns = rows_cols or side
    path = out / f"j2k_bomb_{side}_{rows_cols or side}.dcm"
    out.mkdir(parents=True, exist_ok=True)
    _with_new_uids(ds).save_as(path, enforce_file_format=True)
    return path


def deflate_bomb(out: Path, inflated_mb: int = 256) -> Path:
    """A Deflated Explicit VR Little Endian data set of well under 1 MB that inflates to `inflated_mb` MB
    (a Pixel Data element of zeros): what pydicom would inflate in memory whole."""
    ds = _with_new_uids(_small_cr())
    del ds.PixelData
    body = BytesIO()
    write_dataset(DicomFileLike(body), ds)  # type: ignore[arg-type]
    n = inflated_mb * 1024 * 1024
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunks = [
        deflater.compress(body.getvalue()),
        deflater.compress(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, n)),
    ]
    zeros = bytes(1 << 20)
    chunks += [deflater.compress(zeros) for _ in range(inflated_mb)]
    chunks.append(deflater.flush())
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"deflate_bomb_{inflated_mb}mb.dcm"
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, ds.file_meta)  # type: ignore[arg-type]
        for chunk in chunks:
            f.write(chunk)
    return path


def _frames(ds: Dataset) -> Iterator[bytes]:
    from pydicom.encaps import generate_frames

    return generate_frames(ds.PixelData, number_of_frames=1)
