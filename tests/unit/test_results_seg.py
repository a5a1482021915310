"""node.results.seg: geometry, codes, algorithm identification and a pixel-exact round trip."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from node.results import codes
from node.results.common import DeviceInfo, ResultError
from node.results.seg import build_seg, segment_numbers
from tests.support.paths import shared_data
from tests.support.synthetic_results import MODELS, synthetic_case

DICOM = shared_data() / "dicom"
DEVICE = DeviceInfo(manufacturer="cxr-node", model_name="cxr-node", software_version="0.1.0", serial_number="7")
SOURCES = [
    "01_cr_explicit_le_mono2_12bit_2048x2500.dcm",
    "03_cr_monochrome1_12bit.dcm",
    "11_cr_pixel_padding_value0.dcm",
    "22_sc_chest_8bit_gray.dcm",
    "23_sc_chest_rgb_annotated.dcm",
    "21_cr_explicit_big_endian_12bit.dcm",
]


@pytest.mark.parametrize("name", SOURCES)
def test_seg_round_trip_is_pixel_exact(name: str, tmp_path: Path) -> None:
    case = synthetic_case(DICOM / name)
    seg = build_seg(case.source, case.full, MODELS, device=DEVICE)
    out = tmp_path / "seg.dcm"
    seg.save_as(out)

    back = hd.seg.segread(out)
    assert (back.Rows, back.Columns) == (case.source.Rows, case.source.Columns)
    assert back.SegmentationType == "BINARY"
    assert back.StudyInstanceUID == case.source.StudyInstanceUID
    assert back.PatientID == case.source.PatientID
    assert back.SeriesInstanceUID != case.source.SeriesInstanceUID
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == case.source.SOPInstanceUID
    assert back.PatientOrientation == case.source.PatientOrientation
    numbers = segment_numbers(back)
    assert numbers == {"right_lung": 1, "left_lung": 2, "opacity": 3, "pneumothorax": 4}
    pixels = back.get_pixels_by_source_instance([case.source.SOPInstanceUID], segment_numbers=[1, 2, 3, 4])
    for mask_name, number in numbers.items():
        np.testing.assert_array_equal(pixels[0, :, :, number - 1].astype(bool), case.full[mask_name], err_msg=mask_name)


def test_segment_descriptions() -> None:
    case = synthetic_case(DICOM / "02_cr_implicit_le_12bit.dcm")
    seg = build_seg(case.source, case.full, MODELS, device=DEVICE)
    labels = [item.SegmentLabel for item in seg.SegmentSequence]
    assert labels == ["Right lung", "Left lung", "COVID-19 opacity", "Pneumothorax"]
    right, left, opacity, pntx = seg.SegmentSequence
    for item, laterality in ((right, codes.RIGHT), (left, codes.LEFT)):
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        assert (prop.CodeValue, prop.CodingSchemeDesignator) == ("39607008", "SCT")
        modifier = prop.SegmentedPropertyTypeModifierCodeSequence[0]
        assert modifier.CodeValue == laterality.value
    assert opacity.SegmentedPropertyTypeCodeSequence[0].CodeValue == "112001"
    assert pntx.SegmentedPropertyTypeCodeSequence[0].CodeValue == "36118008"
    assert "SegmentedPropertyTypeModifierCodeSequence" not in codes.LUNG, "shared concepts stay unmodified"
    for item, model in zip(seg.SegmentSequence, [MODELS[0], MODELS[0], MODELS[1], MODELS[2]], strict=True):
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == (model.name, model.version)
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
        assert model.sha256 in algo.AlgorithmParameters
    assert "NOT FOR DIAGNOSTIC USE" in seg.SeriesDescription, "pneumothorax model is experimental"
    assert "not for diagnostic use" in pntx.SegmentDescription
    assert "SegmentDescription" not in right


def test_empty_segment_is_still_described() -> None:
    case = synthetic_case(DICOM / "02_cr_implicit_le_12bit.dcm", pneumothorax=False)
    seg = build_seg(case.source, case.full, MODELS, device=DEVICE)
    assert len(seg.SegmentSequence) == 4
    assert int(seg.NumberOfFrames) == 3, "no frame for the empty pneumothorax segment"
    validated = [m for m in MODELS if m.status == "validated"]
    seg = build_seg(case.source, {k: case.full[k] for k in ("right_lung", "left_lung")}, validated, device=DEVICE)
    assert "DIAGNOSTIC" not in seg.SeriesDescription


def test_all_empty_masks_keep_all_frames() -> None:
    case = synthetic_case(DICOM / "02_cr_implicit_le_12bit.dcm")
    empty = {name: np.zeros_like(mask) for name, mask in case.full.items()}
    seg = build_seg(case.source, empty, MODELS, device=DEVICE)
    assert int(seg.NumberOfFrames) == 4


def test_bad_inputs_raise_result_error() -> None:
    case = synthetic_case(DICOM / "02_cr_implicit_le_12bit.dcm")
    with pytest.raises(ResultError, match="source image"):
        build_seg(case.source, {"right_lung": case.small["right_lung"][:10]}, MODELS, device=DEVICE)
    with pytest.raises(ResultError, match="unknown mask"):
        build_seg(case.source, {"heart": case.full["right_lung"]}, MODELS, device=DEVICE)
    with pytest.raises(ResultError, match="ModelInfo"):
        build_seg(case.source, {"opacity": case.full["opacity"]}, MODELS[:1], device=DEVICE)
    with pytest.raises(ResultError, match="no masks"):
        build_seg(case.source, {}, MODELS, device=DEVICE)


def test_projection_image_with_pixel_spacing_stays_readable(tmp_path: Path) -> None:
    """Many DX carry PixelSpacing as well: the SEG must still read back with highdicom, source untouched."""
    case = synthetic_case(DICOM / "05_dx_for_processing_14bit_window.dcm")
    case.source.PixelSpacing = [0.35, 0.35]
    seg = build_seg(case.source, case.full, MODELS, device=DEVICE)
    assert "PixelSpacing" in case.source
    seg.save_as(tmp_path / "seg.dcm")
    back = hd.seg.segread(tmp_path / "seg.dcm")
    pixels = back.get_pixels_by_source_instance([case.source.SOPInstanceUID], segment_numbers=[1])
    np.testing.assert_array_equal(pixels[0, :, :, 0].astype(bool), case.full["right_lung"])


def test_warning_only_when_an_experimental_model_made_a_segment() -> None:
    case = synthetic_case(DICOM / "02_cr_implicit_le_12bit.dcm")
    lungs = {k: case.full[k] for k in ("right_lung", "left_lung")}
    seg = build_seg(case.source, lungs, MODELS, device=DEVICE)  # the experimental model ran but is not in it
    assert "DIAGNOSTIC" not in seg.SeriesDescription and "DIAGNOSTIC" not in seg.ContentDescription
    seg = build_seg(case.source, case.full, MODELS, device=DEVICE)
    assert seg.ContentDescription.endswith("NOT FOR DIAGNOSTIC USE")
