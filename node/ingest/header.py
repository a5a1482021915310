"""Read only the header of a received data set, and check it is consistent before accepting it.

Pixel data is never decoded here: its value is deferred (pydicom ``defer_size``), and only its declared
length and file offset are used, to catch truncated or mis-described images cheaply.

A Deflated Explicit VR Little Endian data set is inflated here in a stream, into a temporary file beside
it, and at most `max_inflated_bytes` of it: pydicom would inflate all of it in memory first, and 2 MB
of deflated zeros are gigabytes.
"""

from __future__ import annotations

import functools
import logging
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from node.dicom_values import age_years, dicom_date

log = logging.getLogger(__name__)

PIXEL_DATA = Tag(0x7FE0, 0x0010)
UNDEFINED_LENGTH = 0xFFFFFFFF

# C-STORE failure statuses (PS3.4 B.2.3)
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_DATASET_MISMATCH = 0xA900
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
# C-STORE warning (PS3.4 B.2.3): stored, but the data set does not match its SOP class in full
STATUS_STORED_NOT_MATCHING = 0xB007


@functools.cache
def storage_sop_classes() -> frozenset[str]:
    """The SOP classes the Storage SCP accepts (what C-STORE negotiates; STOW-RS checks each part)."""
    from pynetdicom import AllStoragePresentationContexts

    return frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)


class Refusal(Exception):
    """A data set the node will not accept: the failure status to answer and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Header:
    """The attributes ingest, routing and the audit log need; strings are stripped, '' when absent."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str
    body_part: str
    view_position: str
    patient_id: str
    accession_number: str
    study_date: str
    rows: int | None
    columns: int | None
    frames: int
    samples_per_pixel: int
    bits_allocated: int | None
    bits_stored: int | None
    has_pixel_data: bool
    pixel_data_length: int | None  # declared length; None when encapsulated (undefined length)
    pixel_data_offset: int | None  # file offset of the value; None when unknown (deflated)
    photometric: str = ""
    #: Patient's Age, or Study Date minus Patient's Birth Date (routing's age criteria); None = unknown.
    patient_age_years: float | None = None


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception:  # noqa: BLE001 — a malformed value must not stop routing-level reading
        return ""
    return "" if value is None else str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def read_header(path: Path, transfer_syntax_uid: str = "", *, max_inflated_bytes: int | None = None) -> Header:
    """Parse the header of a DICOM file (pixel value deferred); Refusal(0xC000) when it cannot be parsed.

    With `max_inflated_bytes`, a deflated data set is inflated in a stream and refused (0xA700) when it
    inflates to more (see the module docstring).
    """
    if max_inflated_bytes is not None and _deflated(path, transfer_syntax_uid):
        with _inflated(path, max_inflated_bytes) as plain:
            return read_header(plain, transfer_syntax_uid or DeflatedExplicitVRLittleEndian)
    try:
        ds = dcmread(path, defer_size=1024, force=True)
        meta = getattr(ds, "file_meta", None)
        ts = transfer_syntax_uid or (_text(meta, "TransferSyntaxUID") if meta is not None else "")
        raw = ds.get_item(PIXEL_DATA, keep_deferred=True) if PIXEL_DATA in ds else None
        frames = _int(ds, "NumberOfFrames") or 1
        header = Header(
            sop_class_uid=_text(ds, "SOPClassUID"),
            sop_instance_uid=_text(ds, "SOPInstanceUID"),
            study_instance_uid=_text(ds, "StudyInstanceUID"),
            series_instance_uid=_text(ds, "SeriesInstanceUID"),
            transfer_syntax_uid=ts,
            modality=_text(ds, "Modality").upper(),
            body_part=_text(ds, "BodyPartExamined").upper(),
            view_position=_text(ds, "ViewPosition").upper(),
            patient_id=_text(ds, "PatientID"),
            accession_number=_text(ds, "AccessionNumber"),
            study_date=dicom_date(_text(ds, "StudyDate")),
            rows=_int(ds, "Rows"),
            columns=_int(ds, "Columns"),
            frames=frames,
            samples_per_pixel=_int(ds, "SamplesPerPixel") or 1,
            bits_allocated=_int(ds, "BitsAllocated"),
            bits_stored=_int(ds, "BitsStored"),
            has_pixel_data=raw is not None,
            pixel_data_length=_raw_length(raw),
            pixel_data_offset=raw.value_tell if isinstance(raw, RawDataElement) else None,
            photometric=_text(ds, "PhotometricInterpretation").upper(),
            patient_age_years=age_years(
                _text(ds, "PatientAge"),
                _text(ds, "PatientBirthDate"),
                # Study Date is Type 2 and often empty in real files; the image's own dates stand in.
                _text(ds, "StudyDate") or _text(ds, "AcquisitionDate") or _text(ds, "ContentDate"),
            ),
        )
    except Refusal:
        raise
    except Exception as e:  # pydicom raises many types on corrupt input; all mean "cannot understand"
        raise Refusal(STATUS_CANNOT_UNDERSTAND, f"data set cannot be parsed: {type(e).__name__}: {e}") from e
    return header


def _deflated(path: Path, transfer_syntax_uid: str) -> bool:
    if transfer_syntax_uid:
        return transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    try:
        return str(read_file_meta_info(path).get("TransferSyntaxUID", "")) == DeflatedExplicitVRLittleEndian
    except Exception:  # noqa: BLE001 — no or broken file meta: not a deflated file pydicom would inflate
        return False


INFLATE_CHUNK = 1 << 20


@contextmanager
def _inflated(path: Path, max_bytes: int) -> Iterator[Path]:
    """A temporary copy of a deflated file with its data set inflated (file meta: Explicit VR Little
    Endian), removed afterwards; Refusal when it inflates to more than `max_bytes` or is not deflate."""
    with open(path, "rb") as f, tempfile.NamedTemporaryFile(dir=path.parent, suffix=".inflating") as out:
        f.seek(128)
        if f.read(4) != b"DICM":
            raise Refusal(STATUS_CANNOT_UNDERSTAND, "deflated data set without file meta information")
        try:
            tag_group, tag_element, vr, _length, group_length = struct.unpack("<HH2sHL", f.read(12))
        except struct.error as e:
            raise Refusal(STATUS_CANNOT_UNDERSTAND, "file meta information truncated") from e
        if (tag_group, tag_element, vr) != (2, 0, b"UL"):
            raise Refusal(STATUS_CANNOT_UNDERSTAND, "file meta information without its group length")
        meta = read_file_meta_info(path)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(out, meta)  # type: ignore[arg-type]
        f.seek(132 + 12 + group_length)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        try:
            while chunk := f.read(INFLATE_CHUNK):
                while chunk:
                    data = inflater.decompress(chunk, INFLATE_CHUNK)
                    total += len(data)
                    if total > max_bytes:
                        raise Refusal(
                            STATUS_OUT_OF_RESOURCES,
                            f"deflated data set inflates to more than "
                            f"{max_bytes} bytes (storage.max_instance_mb): "
                            "not read",
                        )
                    out.write(data)
                    chunk = inflater.unconsumed_tail
            out.write(inflater.flush(INFLATE_CHUNK))
        except zlib.error as e:
            raise Refusal(STATUS_CANNOT_UNDERSTAND, f"deflated data set cannot be inflated: {e}") from e
        out.flush()
        yield Path(out.name)


def _raw_length(raw: object) -> int | None:
    if isinstance(raw, RawDataElement):
        return None if raw.length == UNDEFINED_LENGTH else raw.length
    value = getattr(raw, "value", None)
    if isinstance(value, bytes | bytearray):
        return len(value)
    return None


def expected_native_length(h: Header) -> int | None:
    """Rows x Columns x Frames x Samples x BitsAllocated / 8 (before even padding); None if not computable.

    YBR_FULL_422 keeps one Cb and one Cr per two pixels (PS3.3 C.7.6.3.1.2): two values per pixel, not three.
    """
    if h.rows is None or h.columns is None or h.bits_allocated is None:
        return None
    samples = 2 if h.photometric == "YBR_FULL_422" and h.samples_per_pixel == 3 else h.samples_per_pixel
    bits = h.rows * h.columns * h.frames * samples * h.bits_allocated
    return (bits + 7) // 8


def check_dataset(h: Header, *, affected_sop_class: str, affected_sop_instance: str, file_size: int) -> None:
    """Raise Refusal when the data set contradicts the C-STORE command or its own image description."""
    if not h.sop_instance_uid and not h.sop_class_uid:
        raise Refusal(STATUS_CANNOT_UNDERSTAND, "not a DICOM data set: no SOP Class UID and no SOP Instance UID")
    if not h.sop_instance_uid:
        raise Refusal(STATUS_DATASET_MISMATCH, "SOP Instance UID (0008,0018) missing from the data set")
    if h.sop_instance_uid != affected_sop_instance.strip():
        raise Refusal(
            STATUS_DATASET_MISMATCH,
            f"SOP Instance UID {h.sop_instance_uid} differs from the "
            f"command's Affected SOP Instance UID {affected_sop_instance}",
        )
    if h.sop_class_uid != affected_sop_class.strip():
        raise Refusal(
            STATUS_DATASET_MISMATCH,
            f"SOP Class UID {h.sop_class_uid or '(missing)'} differs from "
            f"the command's Affected SOP Class UID {affected_sop_class}",
        )
    if not h.study_instance_uid:
        raise Refusal(STATUS_DATASET_MISMATCH, "Study Instance UID (0020,000D) missing")
    if not h.has_pixel_data:
        return
    _check_truncation(h, file_size)
    if not h.rows or not h.columns:
        raise Refusal(STATUS_DATASET_MISMATCH, f"image size Rows={h.rows} Columns={h.columns} is invalid")
    if h.bits_allocated is None or h.bits_stored is None or h.bits_stored > h.bits_allocated:
        raise Refusal(
            STATUS_DATASET_MISMATCH, f"BitsStored {h.bits_stored} and BitsAllocated {h.bits_allocated} are inconsistent"
        )
    expected = _native_expected(h)
    if expected is None or h.pixel_data_length is None:
        return
    # An odd length is padded to even on the wire; trailing padding short of one more frame is stored
    # with a warning (pixel_padding_excess), as pydicom and DCMTK read such files.
    if h.pixel_data_length < expected or pixel_padding_excess(h) >= expected // max(h.frames, 1):
        raise Refusal(
            STATUS_DATASET_MISMATCH,
            f"Pixel Data is {h.pixel_data_length} bytes but Rows x Columns x Frames x Samples x "
            f"BitsAllocated/8 = {expected}",
        )


def pixel_padding_excess(h: Header) -> int:
    """Bytes of native Pixel Data past the image description (and its even padding); 0 when none.

    Some writers pad Pixel Data at the end and readers ignore the excess; check_dataset refuses an excess
    of one frame or more, which would be frames the header does not count.
    """
    expected = _native_expected(h)
    if expected is None or h.pixel_data_length is None:
        return 0
    return max(h.pixel_data_length - (expected + (expected & 1)), 0)


def _native_expected(h: Header) -> int | None:
    """expected_native_length for native (not encapsulated) Pixel Data; None when not checkable."""
    ts = UID(h.transfer_syntax_uid) if h.transfer_syntax_uid else None
    if ts is None or ts.is_encapsulated or h.pixel_data_length is None:
        return None
    return expected_native_length(h)


def _check_truncation(h: Header, file_size: int) -> None:
    if h.pixel_data_length is None or h.pixel_data_offset is None:
        return
    if h.transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        return  # offsets refer to the inflated stream
    present = file_size - h.pixel_data_offset
    if present < h.pixel_data_length:
        raise Refusal(
            STATUS_CANNOT_UNDERSTAND,
            f"data set ends inside Pixel Data: {h.pixel_data_length} bytes declared, {max(present, 0)} present",
        )
