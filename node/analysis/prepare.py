"""Turn a stored DICOM image into the uint8 picture the models see, and map masks back.

Order follows the DICOM grayscale pipeline (PS3.4 N.2): stored values -> Modality LUT (rescale) ->
VOI LUT or window -> Presentation (MONOCHROME1 / INVERSE). Pixel Padding is cropped away before
resizing so the models see only the image, and `Prepared.geometry` keeps the mapping to bring masks
back to the source grid. No torch here: the node stays small (import-linter enforces it).
"""

from __future__ import annotations

import copy
import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

log = logging.getLogger(__name__)

#: Lossy transfer syntaxes: JPEG baseline/extended, JPEG-LS near-lossless, JPEG 2000 (any), HTJ2K lossy.
LOSSY_TRANSFER_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.203",
    }
)
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
FOR_PROCESSING_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX For Processing
        "1.2.840.10008.5.1.4.1.1.1.2.1",  # Mammography For Processing
        "1.2.840.10008.5.1.4.1.1.1.3.1",  # Intra-oral For Processing
    }
)
#: Percentiles used when the data set carries neither VOI LUT nor window.
ROBUST_PERCENTILES = (0.5, 99.5)
#: Default cap on Rows x Columns x Frames x Samples x bytes per sample before any decode: the largest chest
#: detectors are ~4300 x 4300 x 2 bytes (35 MiB), an RGB capture of a 4k screen 48 MiB.
DEFAULT_MAX_PIXEL_BYTES = 100 * 1024 * 1024
JPEG_2000_TRANSFER_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.92",
        "1.2.840.10008.1.2.4.93",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    }
)


class PrepareError(ValueError):
    """The data set cannot be turned into an analysable picture; the reason is final (no retry)."""


@dataclass(frozen=True)
class Geometry:
    """How the model grid lies on the source grid: what a result needs of `prepare` besides the pixels.

    `crop` is (row0, col0, row1, col1) on the source grid (end exclusive): the part of the source that
    was resized to the `rows` x `cols` model grid. Without padding it is the whole image. Kept with a
    published job (:meth:`to_json`) so that `node.finish` maps masks back without decoding the source.
    """

    source_rows: int
    source_cols: int
    crop: tuple[int, int, int, int]
    rows: int
    cols: int
    pixel_spacing_mm: tuple[float, float] | None  # (row, column) spacing on the SOURCE grid
    spacing_attribute: str | None  # "ImagerPixelSpacing" | "PixelSpacing" | None (measurements in pixels)
    notes: tuple[str, ...] = ()

    @property
    def scale(self) -> tuple[float, float]:
        """Prepared pixels per source pixel, (rows, columns)."""
        r0, c0, r1, c1 = self.crop
        return self.rows / (r1 - r0), self.cols / (c1 - c0)

    @property
    def prepared_pixel_spacing_mm(self) -> tuple[float, float] | None:
        """Spacing of one prepared pixel, for areas measured on the model grid."""
        if self.pixel_spacing_mm is None:
            return None
        sy, sx = self.scale
        return self.pixel_spacing_mm[0] / sy, self.pixel_spacing_mm[1] / sx

    def to_json(self) -> dict[str, Any]:
        return {
            "source_rows": self.source_rows,
            "source_cols": self.source_cols,
            "crop": list(self.crop),
            "rows": self.rows,
            "cols": self.cols,
            "pixel_spacing_mm": list(self.pixel_spacing_mm) if self.pixel_spacing_mm else None,
            "spacing_attribute": self.spacing_attribute,
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Geometry:
        """The inverse of :meth:`to_json`; ValueError when `data` is not a geometry."""
        try:
            r0, c0, r1, c1 = (int(v) for v in data["crop"])
            spacing = data["pixel_spacing_mm"]
            geometry = cls(
                source_rows=int(data["source_rows"]),
                source_cols=int(data["source_cols"]),
                crop=(r0, c0, r1, c1),
                rows=int(data["rows"]),
                cols=int(data["cols"]),
                pixel_spacing_mm=(float(spacing[0]), float(spacing[1])) if spacing else None,
                spacing_attribute=data["spacing_attribute"],
                notes=tuple(str(n) for n in data["notes"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a prepared geometry: {e!r}") from e
        if (
            not (0 <= r0 < r1 <= geometry.source_rows and 0 <= c0 < c1 <= geometry.source_cols)
            or geometry.rows < 1
            or geometry.cols < 1
        ):
            raise ValueError(f"inconsistent prepared geometry: {dict(data)}")
        return geometry


@dataclass(frozen=True, kw_only=True)
class Prepared(Geometry):
    """A prepared image: the model input `pixels` (`rows` x `cols`) and, inherited, where it lies on the
    source (:class:`Geometry`)."""

    pixels: np.ndarray  # uint8, 2-D, long side == the requested long side

    @property
    def has_spacing(self) -> bool:
        return self.pixel_spacing_mm is not None

    @property
    def geometry(self) -> Geometry:
        """The geometry alone, without the pixels (what a published job keeps)."""
        return Geometry(**{f.name: getattr(self, f.name) for f in fields(Geometry)})


#: What a malformed attribute value raises inside pydicom and numpy (WindowCenter "abc", RescaleSlope as
#: text, an empty VOI LUT item, an odd-length PixelPaddingValue …): a property of the file, so final.
#: MemoryError and OSError are not here: they say something about the node, and are retried (bounded).
DATA_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    ArithmeticError,
)


def prepare(
    source: Dataset | Path | str, long_side: int = 1024, *, max_pixel_bytes: int = DEFAULT_MAX_PIXEL_BYTES
) -> Prepared:
    """Decode, window and resize one single-frame image. Raises PrepareError with the reason.

    Any error caused by the data set's content is a PrepareError (final: the same file fails the same
    way every time), so a poison instance never loops through the outbox. Nothing is decoded when the
    image would be larger than `max_pixel_bytes`, or when a JPEG / JPEG 2000 codestream describes
    another image than the data set (a few kB can declare 12000 x 12000 pixels: a decompression bomb).
    """
    ds = _read(source)
    try:
        _check_header(ds, max_pixel_bytes)
        _check_codestream(ds)
        return _prepare(ds, long_side)
    except PrepareError:
        raise
    except DATA_ERRORS as e:
        raise PrepareError(f"invalid image attributes: {type(e).__name__}: {e}") from e


def _prepare(ds: Dataset, long_side: int) -> Prepared:
    notes: list[str] = []
    raw = _decode(ds)

    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric == "PALETTE COLOR":
        raw = _palette_to_rgb(ds, raw)
    if raw.ndim == 3:  # colour: pydicom converted YBR_* to RGB already
        notes.append(f"{photometric} converted to luma")
        full_scale = 255.0 if raw.max() <= 255 else float(np.iinfo(raw.dtype).max)
        image = _luma(raw) / full_scale
        valid = np.ones(image.shape, dtype=bool)
    else:
        valid = _non_padding(ds, raw)
        if not valid.any():
            raise PrepareError("every pixel is Pixel Padding Value: no image content")
        if not valid.all():
            notes.append("pixel padding cropped")
        image = _grayscale(ds, raw, valid, notes)
        if _inverted(ds, photometric):
            image = 1.0 - image
            notes.append("MONOCHROME1 inverted" if photometric == "MONOCHROME1" else "Presentation LUT INVERSE")

    crop = _bounding_box(valid)
    r0, c0, r1, c1 = crop
    pixels = _resize(image[r0:r1, c0:c1], long_side)

    spacing, attribute = _pixel_spacing(ds)
    if spacing is None:
        notes.append("no pixel spacing: measurements in pixels")
    elif attribute == "ImagerPixelSpacing":
        notes.append("spacing from ImagerPixelSpacing (detector plane, not magnification corrected)")
    else:
        notes.append(f"spacing from {attribute}")
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class.startswith(SECONDARY_CAPTURE_PREFIX) or "ConversionType" in ds:
        notes.append("secondary capture")
    if sop_class in FOR_PROCESSING_SOP_CLASSES:
        notes.append("for processing image")
    if _lossy(ds):
        notes.append("lossy source")
    log.debug("prepared %dx%d -> %dx%d (%s)", raw.shape[0], raw.shape[1], *pixels.shape, ", ".join(notes))
    return Prepared(
        pixels=pixels,
        source_rows=int(raw.shape[0]),
        source_cols=int(raw.shape[1]),
        crop=crop,
        rows=int(pixels.shape[0]),
        cols=int(pixels.shape[1]),
        pixel_spacing_mm=spacing,
        spacing_attribute=attribute,
        notes=tuple(notes),
    )


def masks_to_source(mask: np.ndarray, g: Geometry) -> np.ndarray:
    """Nearest-neighbour inverse of `prepare`'s crop + resize: prepared-grid mask -> source-grid bool mask
    (`g` a :class:`Geometry`, or the :class:`Prepared` image itself)."""
    if mask.shape != (g.rows, g.cols):
        raise ValueError(f"mask shape {mask.shape} != prepared shape {(g.rows, g.cols)}")
    r0, c0, r1, c1 = g.crop
    # Source pixel centre (i + 0.5) lands at (i + 0.5) * scale on the prepared grid.
    rows = np.minimum(((np.arange(r1 - r0) + 0.5) * g.rows / (r1 - r0)).astype(np.intp), g.rows - 1)
    cols = np.minimum(((np.arange(c1 - c0) + 0.5) * g.cols / (c1 - c0)).astype(np.intp), g.cols - 1)
    full = np.zeros((g.source_rows, g.source_cols), dtype=bool)
    full[r0:r1, c0:c1] = np.asarray(mask, dtype=bool)[np.ix_(rows, cols)]
    return full


# --- reading and validation ---------------------------------------------------------------------


def _read(source: Dataset | Path | str) -> Dataset:
    if isinstance(source, Dataset):
        ds = source
    else:
        try:
            # force=True: bare data sets without preamble/meta are still DICOM (manifest case 24).
            ds = pydicom.dcmread(str(source), force=True)
        except Exception as e:  # pydicom raises many types for broken files
            raise PrepareError(f"cannot read DICOM file: {type(e).__name__}: {e}") from e
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        # pydicom needs the transfer syntax to decode; a bare data set was read with the guessed encoding.
        ds = copy.copy(ds)
        ds.file_meta = FileMetaDataset(getattr(ds, "file_meta", None) or FileMetaDataset())
        ds.file_meta.TransferSyntaxUID = _guessed_syntax(ds)
    return ds


def _guessed_syntax(ds: Dataset) -> UID:
    encoding = getattr(ds, "original_encoding", (True, True))
    implicit, little = encoding if encoding[0] is not None else (True, True)
    if not little:
        return ExplicitVRBigEndian
    return ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def _check_header(ds: Dataset, max_pixel_bytes: int) -> None:
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise PrepareError("float pixel data is not supported")
        if "SOPClassUID" not in ds:
            raise PrepareError("not a DICOM image: no SOP Class UID and no Pixel Data")
        raise PrepareError("no Pixel Data: not an image")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.PhotometricInterpretation).strip().upper()
    except (AttributeError, TypeError, ValueError) as e:
        raise PrepareError(f"image pixel module incomplete or invalid: {e}") from e
    if rows < 1 or cols < 1:
        raise PrepareError(f"Rows x Columns is {rows} x {cols}")
    if not 1 <= stored <= allocated:
        raise PrepareError(f"BitsStored {stored} does not fit BitsAllocated {allocated}")
    if frames > 1:
        raise PrepareError(f"multi-frame not analysed ({frames} frames)")
    if samples == 1 and photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"):
        raise PrepareError(f"photometric interpretation {photometric} not supported for 1 sample per pixel")
    if samples not in (1, 3):
        raise PrepareError(f"SamplesPerPixel {samples} not supported")
    decoded = rows * cols * frames * samples * ((allocated + 7) // 8)
    if decoded > max_pixel_bytes:
        raise PrepareError(
            f"image of {rows} x {cols} x {frames} frame(s) x {samples} sample(s) x {allocated} bits "
            f"decodes to {decoded / 2**20:.0f} MiB, more than prepare.max_pixel_mb "
            f"{max_pixel_bytes / 2**20:.0f}: not decoded"
        )


def _check_codestream(ds: Dataset) -> None:
    """A JPEG / JPEG-LS / JPEG 2000 codestream must describe the image the data set describes: its
    dimensions are read from the codestream header (SOFn / SIZ) before the decoder sees it."""
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if not UID(ts).is_encapsulated:
        return
    is_j2k = ts in JPEG_2000_TRANSFER_SYNTAXES
    if not (is_j2k or ts.startswith("1.2.840.10008.1.2.4.")):
        return  # RLE and others: the decoder writes into a Rows x Columns buffer
    try:
        fragment = _first_fragment(ds.PixelData)
        size = _j2k_size(fragment) if is_j2k else _jpeg_size(fragment)
    except (struct.error, ValueError) as e:
        raise PrepareError(f"unreadable codestream header: {e}") from e
    if size is None:
        raise PrepareError("no image size in the codestream header (no SIZ/SOF marker)")
    cols, rows, components = size
    expected = (int(ds.Columns), int(ds.Rows), int(ds.get("SamplesPerPixel", 1)))
    if (cols, rows if rows else expected[1], components) != expected:
        raise PrepareError(
            f"codestream is {cols} x {rows} with {components} component(s), the data set says "
            f"{expected[0]} x {expected[1]} with {expected[2]}: not decoded"
        )


def _first_fragment(data: bytes, head: int = 65536) -> bytes:
    """The first `head` bytes of the first fragment of encapsulated Pixel Data (after the offset table)."""
    pos = 0
    for _ in range(2):  # the Basic Offset Table item, then the first fragment's item
        group, element, length = struct.unpack_from("<HHL", data, pos)
        if (group, element) != (0xFFFE, 0xE000):
            raise ValueError(f"no item at byte {pos} of the encapsulated Pixel Data")
        start, pos = pos + 8, pos + 8 + length
    return bytes(data[start : start + min(length, head)])


def _j2k_size(code: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from the SIZ marker of a JPEG 2000 codestream (or a JP2 file)."""
    at = code.find(b"\xff\x4f\xff\x51")
    if at < 0:
        return None
    _lsiz, _rsiz, xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">HHLLLL", code, at + 4)
    (csiz,) = struct.unpack_from(">H", code, at + 4 + 36)
    return xsiz - xosiz, ysiz - yosiz, csiz


#: Start-of-frame markers of ISO 10918 (all processes) and JPEG-LS (SOF55).
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})


def _jpeg_size(code: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from the first SOFn segment of a JPEG / JPEG-LS codestream; height 0
    means it is given later (DNL) and is not checked."""
    if code[:2] != b"\xff\xd8":
        raise ValueError("no JPEG start-of-image marker")
    pos = 2
    while pos + 4 <= len(code):
        if code[pos] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {pos}")
        marker = code[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        (length,) = struct.unpack_from(">H", code, pos + 2)
        if marker in _SOF_MARKERS:
            _precision, height, width, components = struct.unpack_from(">BHHB", code, pos + 4)
            return width, height, components
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + length
    return None


def _decode(ds: Dataset) -> np.ndarray:
    try:
        arr = ds.pixel_array
    except Exception as e:  # decoders raise ValueError, RuntimeError, NotImplementedError …
        ts = ds.file_meta.get("TransferSyntaxUID", "?")
        name = getattr(UID(str(ts)), "name", ts)
        raise PrepareError(f"cannot decode pixel data ({name}): {type(e).__name__}: {e}") from e
    expected = (int(ds.Rows), int(ds.Columns))
    if arr.shape[:2] != expected:
        raise PrepareError(f"decoded shape {arr.shape} does not match Rows x Columns {expected}")
    return arr


# --- grayscale pipeline ---------------------------------------------------------------------------


def _non_padding(ds: Dataset, raw: np.ndarray) -> np.ndarray:
    """Pixel Padding Value (and Range Limit) are stored values, compared before the Modality LUT."""
    if "PixelPaddingValue" not in ds:
        return np.ones(raw.shape, dtype=bool)
    pad = int(ds.PixelPaddingValue)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None:
        return np.asarray(raw != pad)
    lo, hi = sorted((pad, int(limit)))
    return ~((raw >= lo) & (raw <= hi))


def _grayscale(ds: Dataset, raw: np.ndarray, valid: np.ndarray, notes: list[str]) -> np.ndarray:
    """Stored values -> [0, 1] float, MONOCHROME2 sense (not yet inverted)."""
    values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        notes.append("VOI LUT")
        return _voi_lut(ds.VOILUTSequence[0], values, ds)
    centers, widths = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centers is not None and widths is not None:
        center = float(centers[0] if isinstance(centers, pydicom.multival.MultiValue) else centers)
        width = float(widths[0] if isinstance(widths, pydicom.multival.MultiValue) else widths)
        if width >= 1:
            return _window(values, center, width, str(ds.get("VOILUTFunction", "LINEAR")).upper())
        notes.append(f"window width {width} invalid: ignored")
    lo, hi = np.percentile(values[valid], ROBUST_PERCENTILES)
    notes.append("no VOI: robust min/max")
    return _normalise(values, float(lo), float(hi))


def _voi_lut(item: Dataset, values: np.ndarray, ds: Dataset) -> np.ndarray:
    """PS3.3 C.11.2.1.1: look values up in the first VOI LUT; output scaled by the LUT's bit depth."""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536  # 0 means 2^16 entries
    if first > 32767 and int(ds.get("PixelRepresentation", 0)) == 1:
        first -= 65536  # the first mapped value is signed when the pixels are
    data = item.LUTData
    if isinstance(data, bytes):  # OW: pydicom leaves the words raw, in the file's byte order
        little = getattr(ds, "original_encoding", (None, True))[1] is not False
        dtype = np.dtype(np.uint8) if len(data) == entries else np.dtype("<u2" if little else ">u2")
        lut = np.frombuffer(data, dtype=dtype)[:entries].astype(np.float64)
    else:
        lut = np.asarray(data, dtype=np.float64)[:entries]
    if lut.size != entries:
        raise PrepareError(f"VOI LUT has {lut.size} entries, its descriptor says {entries}")
    index = np.clip(np.rint(values).astype(np.int64) - first, 0, entries - 1)
    return _normalise(lut[index], 0.0, float(2**bits - 1))


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2/3: LINEAR (default), LINEAR_EXACT, SIGMOID, mapped to [0, 1]."""
    if function == "SIGMOID":
        return np.asarray(1.0 / (1.0 + np.exp(-4.0 * (values - center) / width)), dtype=np.float64)
    if function == "LINEAR_EXACT":
        return np.clip((values - (center - width / 2)) / width, 0.0, 1.0)
    return (
        np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
        if width > 1
        else ((values > center - 0.5).astype(np.float64))
    )


def _normalise(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float64)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def _inverted(ds: Dataset, photometric: str) -> bool:
    inverse = photometric == "MONOCHROME1"
    if str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE":
        inverse = not inverse
    return inverse


def _palette_to_rgb(ds: Dataset, raw: np.ndarray) -> np.ndarray:
    try:
        return np.asarray(apply_color_lut(raw, ds))
    except Exception as e:  # malformed palette descriptors/data
        raise PrepareError(f"cannot apply the palette colour LUT: {type(e).__name__}: {e}") from e


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma, what a grayscale viewer shows for an RGB capture."""
    weights = np.array([0.299, 0.587, 0.114])
    return np.asarray(rgb[..., :3].astype(np.float64) @ weights)


def _bounding_box(valid: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(valid.any(axis=1))
    cols = np.flatnonzero(valid.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def _resize(image: np.ndarray, long_side: int) -> np.ndarray:
    h, w = image.shape
    scale = long_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # PIL wants (width, height)
    resized = Image.fromarray(image.astype(np.float32), mode="F").resize(size, Image.Resampling.LANCZOS)
    return np.clip(np.rint(np.asarray(resized) * 255.0), 0, 255).astype(np.uint8)


def _pixel_spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str | None]:
    """ImagerPixelSpacing (projection radiography, at the detector) first, then PixelSpacing."""
    for attribute in ("ImagerPixelSpacing", "PixelSpacing"):
        value = ds.get(attribute)
        try:
            if value is not None and len(value) == 2 and float(value[0]) > 0 and float(value[1]) > 0:
                return (float(value[0]), float(value[1])), attribute
        except (TypeError, ValueError):
            log.warning("ignoring unreadable %s %r", attribute, value)
    return None, None


def _lossy(ds: Dataset) -> bool:
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    return str(ds.get("LossyImageCompression", "00")) == "01" or ts in LOSSY_TRANSFER_SYNTAXES
