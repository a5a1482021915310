"""What the console shows of an instance's results: overlay thumbnails and the SR measurements.

The thumbnail is the source image as the models saw it (`node.analysis.prepare`, so the same windowing and
MONOCHROME1 handling) with each SEG segment blended in its own colour. Measurements are every
numeric item of the SR (TID 1500), the severity score among them. Model cards are read as JSON
files: the node never imports the model code.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset

from node.analysis.decoding import prepare_isolated
from node.analysis.prepare import PrepareError
from node.results import codes
from node.runtime.config import Settings
from workers.catalogue import MASKS

log = logging.getLogger(__name__)

# Segment label (lower case) -> RGB; unknown labels cycle through the spare colours.
SEGMENT_COLOURS = {m.label.lower(): m.rgb for m in MASKS}
_SPARE = [(165, 94, 234), (254, 202, 87), (72, 219, 251), (255, 107, 129)]
SEVERITY_CODE = codes.SEVERITY.value


@dataclass(frozen=True)
class Measurement:
    group: str  # the measurement group's Tracking Identifier (the SEG segment it describes)
    name: str  # concept name, with its finding site/laterality modifiers, e.g. "Opacity % (Lower zone, Left)"
    value: str
    unit: str
    code: str


def seg_masks(seg: Dataset) -> dict[str, np.ndarray]:
    """Segment label -> bool mask (rows, cols) of a single-image BINARY/FRACTIONAL SEG."""
    frames = seg.pixel_array
    if frames.ndim == 2:
        frames = frames[np.newaxis]
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    masks: dict[str, np.ndarray] = {}
    per_frame = seg.get("PerFrameFunctionalGroupsSequence", [])
    for index, frame in enumerate(frames):
        number = (
            int(per_frame[index].SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            if index < len(per_frame)
            else index + 1
        )
        label = labels.get(number, f"segment {number}")
        mask = frame > 0
        masks[label] = masks[label] | mask if label in masks else mask
    return masks


def _resize_mask(mask: np.ndarray, crop: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
    r0, c0, r1, c1 = crop
    im = Image.fromarray(mask[r0:r1, c0:c1].astype(np.uint8) * 255)
    return np.asarray(im.resize((shape[1], shape[0]), Image.Resampling.NEAREST)) > 0


def render_overlay(
    settings: Settings, source_path: Path, seg_path: Path | None, long_side: int = 384, alpha: float = 0.45
) -> bytes:
    """PNG bytes: the prepared source with SEG segments blended in. Raises PrepareError/OSError.

    The source is decoded in the memory-limited decoder process (node.analysis.decoding), like for analysis."""
    prepared = prepare_isolated(settings, source_path, long_side=long_side)
    grey = prepared.pixels.astype(np.float32)
    rgb = np.repeat(grey[:, :, np.newaxis], 3, axis=2)
    if seg_path is not None:
        seg = pydicom.dcmread(seg_path)
        spare = iter(_SPARE * 4)
        for label, mask in seg_masks(seg).items():
            if mask.shape != (prepared.source_rows, prepared.source_cols):
                log.warning(
                    "SEG %s: segment %r is %s, source is %dx%d: not drawn",
                    seg_path.name,
                    label,
                    mask.shape,
                    prepared.source_rows,
                    prepared.source_cols,
                )
                continue
            small = _resize_mask(mask, prepared.crop, prepared.pixels.shape)
            colour = np.array(SEGMENT_COLOURS.get(label.lower()) or next(spare), dtype=np.float32)
            rgb[small] = (1 - alpha) * rgb[small] + alpha * colour
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def legend(seg_path: Path) -> list[tuple[str, str]]:
    """(segment label, CSS colour) for the overlay's legend."""
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    out, spare = [], iter(_SPARE * 4)
    for s in seg.SegmentSequence:
        r, g, b = SEGMENT_COLOURS.get(str(s.SegmentLabel).lower()) or next(spare)
        out.append((str(s.SegmentLabel), f"rgb({r},{g},{b})"))
    return out


def _modifiers(item: Any) -> list[str]:
    """Meanings of the HAS CONCEPT MOD codes below a content item (finding site, then its laterality)."""
    out: list[str] = []
    for child in item.get("ContentSequence", []):
        if child.get("RelationshipType") == "HAS CONCEPT MOD" and child.get("ValueType") == "CODE":
            out.append(str(child.ConceptCodeSequence[0].CodeMeaning))
            out += _modifiers(child)
    return out


def _number(text: str) -> str:
    value = float(text)
    return str(int(value)) if value.is_integer() else f"{value:g}"


def sr_measurements(sr_path: Path) -> list[Measurement]:
    """The numbers and qualitative findings of each TID 1500 measurement group, in document order."""
    ds = pydicom.dcmread(sr_path)
    found: list[Measurement] = []

    def walk(items: Any, group: str) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
            kind, rel = item.get("ValueType"), item.get("RelationshipType")
            if kind == "TEXT" and name is not None and name.CodeValue == "112039":  # Tracking Identifier
                group = str(item.TextValue)
            if kind == "NUM" and name is not None and "MeasuredValueSequence" in item:
                mv = item.MeasuredValueSequence[0]
                unit = mv.MeasurementUnitsCodeSequence[0].CodeValue if "MeasurementUnitsCodeSequence" in mv else ""
                mods = _modifiers(item)
                label = f"{name.CodeMeaning} ({', '.join(mods)})" if mods else str(name.CodeMeaning)
                found.append(Measurement(group, label, _number(str(mv.NumericValue)), str(unit), str(name.CodeValue)))
            elif kind == "CODE" and rel == "CONTAINS" and name is not None and name.CodeValue != "121071":
                mods = _modifiers(item)  # e.g. the zone of an Opacity Present/Absent
                label = f"{name.CodeMeaning} ({', '.join(mods)})" if mods else str(name.CodeMeaning)
                found.append(
                    Measurement(group, label, str(item.ConceptCodeSequence[0].CodeMeaning), "", str(name.CodeValue))
                )
            if "ContentSequence" in item and kind == "CONTAINER":
                walk(item.ContentSequence, group)

    walk(ds.get("ContentSequence", []), "")
    return found


def severity(measurements: list[Measurement]) -> str | None:
    for m in measurements:
        if m.code == SEVERITY_CODE:
            return m.value
    return None


def safe_overlay(settings: Settings, source_path: Path, seg_path: Path | None) -> bytes | None:
    try:
        return render_overlay(settings, source_path, seg_path)
    except (PrepareError, OSError, ValueError, AttributeError, KeyError) as e:
        log.warning("no thumbnail for %s: %s", source_path.name, e)
        return None
