"""Secondary Capture with the masks outlined in colour, for viewers that cannot show a SEG.

Drawn on the prepared (model-input) picture, so what the reader sees is what the models saw. The
pixels carry burned-in annotation (outlines and a legend), which the header says (BurnedInAnnotation
YES); the object references its source image and lives in its own series.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from workers.api import MASK_NAMES, ModelInfo
from workers.catalogue import MASK_BY_NAME

from .common import DeviceInfo, ResultError, experimental_models, not_for_diagnostic_suffix

log = logging.getLogger(__name__)

COLOURS: dict[str, tuple[int, int, int]] = {name: spec.rgb for name, spec in MASK_BY_NAME.items()}
LABELS: dict[str, str] = {name: spec.short_label for name, spec in MASK_BY_NAME.items()}


def build_overlay(
    source: Dataset,
    pixels: np.ndarray,
    masks: Mapping[str, np.ndarray],
    models: Sequence[ModelInfo],
    *,
    device: DeviceInfo,
    pixel_spacing_mm: tuple[float, float] | None = None,
    series_number: int = 9003,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.sc.SCImage:
    """RGB Secondary Capture of `pixels` (uint8, the prepared grid) with `masks` (same grid) outlined."""
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ResultError(f"expected the prepared uint8 2-D picture, got {pixels.dtype} {pixels.shape}")
    rgb = np.repeat(pixels[..., np.newaxis], 3, axis=2)
    for name in MASK_NAMES:
        if name not in masks:
            continue
        mask = np.asarray(masks[name], dtype=bool)
        if mask.shape != pixels.shape:
            raise ResultError(f"mask {name!r} is {mask.shape}, the picture is {pixels.shape}")
        rgb[_outline(mask, width=max(1, pixels.shape[0] // 400))] = COLOURS[name]
    experimental = experimental_models(models)
    rgb = _legend(
        rgb, [name for name in MASK_NAMES if name in masks], "AI overlay" + not_for_diagnostic_suffix(experimental)
    )

    orientation = source.get("PatientOrientation")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=instance_number,
        manufacturer=device.manufacturer,
        pixel_spacing=pixel_spacing_mm,  # type: ignore[arg-type]  # highdicom annotates tuple[int, int]
        patient_orientation=tuple(orientation) if orientation and len(orientation) == 2 else ("L", "F"),
        transfer_syntax_uid=hd.UID("1.2.840.10008.1.2.1"),
    )
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = "AI segmentation outlines burned into the model input picture"
    sc.SeriesDescription = ("AI overlay" + not_for_diagnostic_suffix(experimental))[:64]
    sc.SourceImageSequence = DicomSequence([_reference(source)])
    # General Series Laterality is Type 2C: required (empty = unknown) unless the body part is known to be
    # unpaired, and then it must be absent (dciodvfy checks both). So the body part travels with it.
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined
    if source.get("Laterality"):
        sc.Laterality = source.Laterality
    elif "BodyPartExamined" not in sc:
        sc.Laterality = ""
    log.info("overlay built: %dx%d, %d outlines", pixels.shape[0], pixels.shape[1], len(masks))
    return sc


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of `mask` within `width` pixels of its border (4-neighbour erosion, numpy only)."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:, :] &= inner[:-1, :]
        shrunk[:-1, :] &= inner[1:, :]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    outline: np.ndarray = mask & ~inner
    return outline


def _legend(rgb: np.ndarray, names: list[str], title: str) -> np.ndarray:
    image = Image.fromarray(rgb, mode="RGB")
    draw = ImageDraw.Draw(image)
    x, y = 8, 8
    draw.text((x, y), title, fill=(255, 255, 255))
    for name in names:
        y += 14
        draw.rectangle((x, y + 2, x + 8, y + 10), fill=COLOURS[name])
        draw.text((x + 14, y), LABELS[name], fill=(255, 255, 255))
    return np.asarray(image, dtype=np.uint8)


def _reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item
