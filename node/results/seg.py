"""DICOM Segmentation (BINARY) of the model masks on the source image's own pixel grid.

One segment per mask in `workers.api.MASK_NAMES` order (right lung, left lung, opacity, pneumothorax),
numbered from 1 as the SEG IOD requires. Each segment's TrackingID is the mask name, so the SR can
find its segment number without a side channel, and its Tracking UID is the one the SR's measurement
group of the same finding carries (IHE AIR: one finding, one tracking UID across objects). Each
segment is AUTOMATIC with the TID 4019-style Segment Algorithm Identification of its model; each
model is also a Contributing Equipment item (node.results.common). highdicom checks the object on
construction.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from workers.api import MASK_NAMES, ModelInfo
from workers.catalogue import MASK_BY_NAME

from . import codes
from .common import (
    DeviceInfo,
    ResultError,
    algorithm_identification,
    experimental_models,
    not_for_diagnostic_suffix,
    set_content_datetime,
    set_contributing_equipment,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentSpec:
    label: str
    model: str  # which ModelInfo identifies the algorithm
    category: hd.sr.CodedConcept
    property_type: hd.sr.CodedConcept
    laterality: hd.sr.CodedConcept | None
    colour: tuple[float, float, float]  # CIELab, what viewers use to draw the segment


SEGMENTS: dict[str, SegmentSpec] = {
    name: SegmentSpec(
        MASK_BY_NAME[name].label,
        MASK_BY_NAME[name].model,
        category,
        property_type,
        laterality,
        MASK_BY_NAME[name].cielab,
    )
    for name, category, property_type, laterality in (
        ("right_lung", codes.ANATOMICAL_STRUCTURE, codes.LUNG, codes.RIGHT),
        ("left_lung", codes.ANATOMICAL_STRUCTURE, codes.LUNG, codes.LEFT),
        ("opacity", codes.MORPHOLOGICALLY_ALTERED, codes.OPACITY, None),
        ("pneumothorax", codes.MORPHOLOGICALLY_ALTERED, codes.PNEUMOTHORAX, None),
    )
}
assert tuple(SEGMENTS) == MASK_NAMES, "SEG segment order follows workers.api.MASK_NAMES"


def build_seg(
    source: Dataset,
    masks: Mapping[str, np.ndarray],
    models: Sequence[ModelInfo],
    *,
    device: DeviceInfo,
    series_number: int = 9001,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    started: datetime | None = None,
) -> hd.seg.Segmentation:
    """Build a BINARY SEG of `masks` (bool, source rows x columns) referencing `source`.

    Segments appear in MASK_NAMES order for the masks given; an all-empty mask keeps its segment
    description (no frame is stored for it: highdicom omits empty frames). `started` (when the
    analysis started) becomes the Content Date/Time; None keeps highdicom's creation time.
    """
    rows, cols = int(source.Rows), int(source.Columns)
    unknown = set(masks) - set(SEGMENTS)
    if unknown:
        raise ResultError(f"unknown mask names {sorted(unknown)}; known: {list(SEGMENTS)}")
    names = [name for name in MASK_NAMES if name in masks]
    if not names:
        raise ResultError("no masks to store")
    by_model = {m.name: m for m in models}
    descriptions = []
    for number, name in enumerate(names, start=1):
        mask = np.asarray(masks[name])
        if mask.shape != (rows, cols):
            raise ResultError(f"mask {name!r} is {mask.shape}, the source image is {(rows, cols)}")
        spec = SEGMENTS[name]
        model = by_model.get(spec.model)
        if model is None:
            raise ResultError(f"mask {name!r} needs the ModelInfo of model {spec.model!r}")
        descriptions.append(_segment(number, name, spec, model))

    labelmap = np.stack([np.asarray(masks[name], dtype=bool) for name in names], axis=-1)[np.newaxis]
    used = {SEGMENTS[name].model: by_model[SEGMENTS[name].model] for name in names}
    suffix = not_for_diagnostic_suffix(experimental_models(list(used.values())))
    seg = hd.seg.Segmentation(
        source_images=[_geometry_source(source)],
        pixel_array=labelmap,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=instance_number,
        manufacturer=device.manufacturer,
        manufacturer_model_name=device.model_name,
        software_versions=device.software_version,
        device_serial_number=device.serial_number,
        content_label="CXRSEG",
        content_description=("AI " + "/".join(used) + suffix)[:64],
        content_creator_name=None,
        omit_empty_frames=True,
    )
    seg.SeriesDescription = ("AI segmentation" + suffix)[:64]
    set_contributing_equipment(seg, list(used.values()), device, started)
    set_content_datetime(seg, started)
    # Projection radiographs have no Frame of Reference; the image plane is described by the
    # source's Patient Orientation, which the SEG must repeat (dciodvfy reports it missing otherwise).
    if "PatientOrientation" in source:
        seg.PatientOrientation = source.PatientOrientation
    for keyword in ("BodyPartExamined", "Laterality"):
        if keyword in source and keyword not in seg:
            setattr(seg, keyword, getattr(source, keyword))
    for item, name in zip(seg.SegmentSequence, names, strict=True):
        model = by_model[SEGMENTS[name].model]
        if model.status != "validated":
            item.SegmentDescription = f"{SEGMENTS[name].label}: experimental model, not for diagnostic use"
    log.info("SEG built: %d segments (%s)%s", len(names), ", ".join(names), suffix)
    return seg


def _geometry_source(source: Dataset) -> Dataset:
    """The source as highdicom should see it for geometry.

    A projection radiograph (no Frame of Reference) with PixelSpacing would give the SEG a Pixel
    Measures Sequence without SliceThickness, which highdicom's own reader then refuses; the SEG
    shares the source grid anyway, so viewers take the spacing from the source.
    """
    if "FrameOfReferenceUID" in source or "PixelSpacing" not in source:
        return source
    view = Dataset()  # a new element dict (elements shared): the caller's data set is not modified
    for element in source:
        if element.keyword != "PixelSpacing":
            view.add(element)
    if hasattr(source, "file_meta"):
        view.file_meta = source.file_meta
    return view


def segment_numbers(seg: Dataset) -> dict[str, int]:
    """Mask name -> segment number, read from the SEG's TrackingID values."""
    return {str(item.TrackingID): int(item.SegmentNumber) for item in seg.SegmentSequence if "TrackingID" in item}


def tracking_uids(seg: Dataset) -> dict[str, str]:
    """Mask name -> the segment's Tracking UID (the SR tracks the same finding with the same UID)."""
    return {
        str(item.TrackingID): str(item.TrackingUID)
        for item in seg.SegmentSequence
        if "TrackingID" in item and "TrackingUID" in item
    }


def _segment(number: int, name: str, spec: SegmentSpec, model: ModelInfo) -> hd.seg.SegmentDescription:
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=spec.label,
        segmented_property_category=spec.category,
        segmented_property_type=spec.property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(model),
        tracking_uid=hd.UID(),
        tracking_id=name,
        display_color=hd.color.CIELabColor(*spec.colour),
    )
    if spec.laterality is not None:
        # highdicom has no argument for it: the modifier lives inside the property type item.
        modifier = Dataset()
        modifier.CodeValue = spec.laterality.value
        modifier.CodingSchemeDesignator = spec.laterality.scheme_designator
        modifier.CodeMeaning = spec.laterality.meaning
        # A copy: the item is the shared module-level concept (codes.LUNG), which must stay unmodified.
        property_type = copy.deepcopy(description.SegmentedPropertyTypeCodeSequence[0])
        property_type.SegmentedPropertyTypeModifierCodeSequence = [modifier]
        description.SegmentedPropertyTypeCodeSequence = [property_type]
    return description
