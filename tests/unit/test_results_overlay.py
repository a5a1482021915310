"""node.results.overlay: an RGB Secondary Capture with the outlines, tied to its source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.results.common import DeviceInfo, ResultError
from node.results.overlay import COLOURS, build_overlay
from tests.support.paths import shared_data
from tests.support.synthetic_results import MODELS, synthetic_case

DICOM = shared_data() / "dicom"


def test_overlay_outlines_masks_on_the_prepared_picture(tmp_path: Path) -> None:
    case = synthetic_case(DICOM / "03_cr_monochrome1_12bit.dcm")
    sc = build_overlay(
        case.source,
        case.prepared.pixels,
        case.small,
        MODELS,
        device=DeviceInfo(),
        pixel_spacing_mm=case.prepared.prepared_pixel_spacing_mm,
    )
    sc.save_as(tmp_path / "sc.dcm")
    back = pydicom.dcmread(tmp_path / "sc.dcm")
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert back.PhotometricInterpretation == "RGB" and back.BurnedInAnnotation == "YES"
    assert back.StudyInstanceUID == case.source.StudyInstanceUID and back.PatientID == case.source.PatientID
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == case.source.SOPInstanceUID
    assert "NOT FOR DIAGNOSTIC USE" in back.SeriesDescription
    rgb = back.pixel_array
    assert rgb.shape == (*case.prepared.pixels.shape, 3)
    for name, colour in COLOURS.items():
        mask = case.small[name]
        painted = np.all(rgb == colour, axis=-1)
        assert painted[mask].sum() > 0, name
    inside = case.small["left_lung"] & ~case.small["pneumothorax"]
    grey = rgb[inside]
    assert np.mean((grey[:, 0] == grey[:, 1]) & (grey[:, 1] == grey[:, 2])) > 0.9, "interior stays grey"


def test_overlay_rejects_wrong_inputs() -> None:
    case = synthetic_case(DICOM / "02_cr_implicit_le_12bit.dcm")
    with pytest.raises(ResultError):
        build_overlay(case.source, case.prepared.pixels.astype(np.float32), case.small, MODELS, device=DeviceInfo())
    with pytest.raises(ResultError, match="mask"):
        build_overlay(
            case.source, case.prepared.pixels, {"opacity": case.full["opacity"][:5]}, MODELS, device=DeviceInfo()
        )
