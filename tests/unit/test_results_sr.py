"""node.results.sr: the TID 1500 report carries the worker's numbers, each group references its segment."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from node.results import codes
from node.results.common import DeviceInfo, ResultError
from node.results.seg import build_seg, segment_numbers
from node.results.sr import COMMENT, EXPERIMENTAL_COMMENT, build_sr
from tests.support.paths import shared_data
from tests.support.synthetic_results import MODELS, Case, synthetic_case

DICOM = shared_data() / "dicom"
DEVICE = DeviceInfo()


def _report(case: Case, tmp_path: Path) -> tuple[pydicom.Dataset, hd.sr.MeasurementReport, pydicom.Dataset]:
    seg = build_seg(case.source, case.full, case.result.models, device=DEVICE)
    sr = build_sr(
        case.source,
        seg,
        case.result,
        pixel_spacing_mm=case.prepared.prepared_pixel_spacing_mm,
        device=DEVICE,
        notes=case.prepared.notes,
    )
    out = tmp_path / "sr.dcm"
    sr.save_as(out)
    back = hd.sr.srread(out)
    return seg, hd.sr.MeasurementReport.from_sequence([back]), back


def _groups(report: hd.sr.MeasurementReport) -> dict[str, hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    groups = report.get_volumetric_roi_measurement_groups()
    return {str(g.tracking_identifier): g for g in groups}


ALGORITHM_NAME, ALGORITHM_PARAMETERS = "111001", "111002"


def _texts(group: pydicom.Dataset, code_value: str) -> list[str]:
    """TEXT content items with this concept name anywhere below the group (TID 4019 algorithm identification)."""
    found = []
    for item in group.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == code_value and item.ValueType == "TEXT":
            found.append(str(item.TextValue))
        if "ContentSequence" in item:
            found += _texts(item, code_value)
    return found


def _value(
    group: hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations,
    name: hd.sr.CodedConcept,
    site: hd.sr.CodedConcept | None = None,
    laterality: hd.sr.CodedConcept | None = None,
) -> float:
    for m in group.get_measurements(name=name):
        sites = m.finding_sites
        if site is None or any(s.value == site and s.laterality == laterality for s in sites):
            return float(m.value)
    raise AssertionError(f"no measurement {name.meaning} at {site} {laterality}")


def test_numbers_equal_the_worker_output(tmp_path: Path) -> None:
    case = synthetic_case(DICOM / "01_cr_explicit_le_mono2_12bit_2048x2500.dcm")
    seg, report, sr = _report(case, tmp_path)
    assert sr.StudyInstanceUID == case.source.StudyInstanceUID and sr.PatientID == case.source.PatientID
    assert sr.SeriesInstanceUID not in (seg.SeriesInstanceUID, case.source.SeriesInstanceUID)
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription  # the pneumothorax model is experimental
    evidence = {
        ref.ReferencedSOPInstanceUID
        for series in sr.CurrentRequestedProcedureEvidenceSequence
        for s in series.ReferencedSeriesSequence
        for ref in s.ReferencedSOPSequence
    }
    assert evidence == {case.source.SOPInstanceUID, seg.SOPInstanceUID}

    groups = _groups(report)
    assert set(groups) == {"Right lung", "Left lung", "COVID-19 opacity", "Pneumothorax"}
    numbers = segment_numbers(seg)
    for label, mask in (
        ("Right lung", "right_lung"),
        ("Left lung", "left_lung"),
        ("COVID-19 opacity", "opacity"),
        ("Pneumothorax", "pneumothorax"),
    ):
        ref = groups[label].referenced_segment
        assert ref is not None
        assert ref.referenced_segment_numbers == [numbers[mask]]
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID

    result, spacing = case.result, case.prepared.prepared_pixel_spacing_mm
    assert spacing is not None and result.lung_area_px is not None
    cm2 = spacing[0] * spacing[1] / 100
    assert _value(groups["Right lung"], codes.AREA) == pytest.approx(result.lung_area_px["right"] * cm2, abs=0.01)
    assert _value(groups["Left lung"], codes.AREA) == pytest.approx(result.lung_area_px["left"] * cm2, abs=0.01)
    opacity = groups["COVID-19 opacity"]
    assert _value(opacity, codes.SEVERITY) == result.severity_score
    from node.results.sr import OPACITY_PERCENTAGE, ZONES

    assert result.opacity_fraction is not None and result.zone_fractions is not None
    assert _value(opacity, OPACITY_PERCENTAGE, codes.LUNG, codes.RIGHT) == pytest.approx(
        100 * result.opacity_fraction["right"], abs=0.01
    )
    for (side, zone), fraction in zip(ZONES, result.zone_fractions, strict=True):
        assert _value(opacity, OPACITY_PERCENTAGE, zone, side) == pytest.approx(100 * fraction, abs=0.01)
    counted = _zones_counted(opacity[0])
    assert counted == {zone: affected for zone, affected in zip(ZONES, result.zone_affected or [], strict=True)}

    pntx = groups["Pneumothorax"]
    evaluations = {e.name.value: e.value for e in pntx.get_qualitative_evaluations()}
    assert evaluations[codes.PNEUMOTHORAX.value] == codes.PRESENT
    assert evaluations[codes.LATERALITY.value] == codes.LEFT
    assert _texts(pntx[0], COMMENT.value) == [EXPERIMENTAL_COMMENT]  # the experimental model's group says so
    assert _texts(groups["Right lung"][0], COMMENT.value) == []
    assert _value(pntx, codes.AREA) == pytest.approx((result.pneumothorax_area_px or 0) * cm2, abs=0.01)
    assert _texts(pntx[0], ALGORITHM_NAME) == ["pneumothorax"]
    parameters = " ".join(_texts(pntx[0], ALGORITHM_PARAMETERS))
    assert MODELS[2].sha256 in parameters and "NOT FOR DIAGNOSTIC USE" in parameters
    # a weak model says so where its numbers are read: the card's held-out figures
    assert f"held-out performance: {MODELS[2].performance}" in _texts(pntx[0], ALGORITHM_PARAMETERS)
    assert not any("held-out" in t for t in _texts(groups["Right lung"][0], ALGORITHM_PARAMETERS))


def test_without_pixel_spacing_areas_are_pixels_and_say_so(tmp_path: Path) -> None:
    case = synthetic_case(DICOM / "22_sc_chest_8bit_gray.dcm", pneumothorax=False)
    assert case.prepared.prepared_pixel_spacing_mm is None
    _, report, _ = _report(case, tmp_path)
    groups = _groups(report)
    lung = groups["Right lung"]
    area = lung.get_measurements(name=codes.AREA)[0]
    assert area.unit == codes.UNIT_PIXELS
    assert case.result.lung_area_px is not None
    assert float(area.value) == case.result.lung_area_px["right"]
    assert "input: secondary capture" in _texts(lung[0], ALGORITHM_PARAMETERS)
    evaluations = {e.name.value: e.value for e in groups["Pneumothorax"].get_qualitative_evaluations()}
    assert evaluations[codes.PNEUMOTHORAX.value] == codes.ABSENT and codes.LATERALITY.value not in evaluations


def _zones_counted(group: pydicom.Dataset) -> dict[tuple[hd.sr.CodedConcept, hd.sr.CodedConcept], bool]:
    """(side, zone) -> Opacity Present, read from the CODE items that have the zone as their finding site."""
    found = {}
    for item in group.ContentSequence:
        if item.ValueType != "CODE" or item.ConceptNameCodeSequence[0].CodeValue != codes.OPACITY.value:
            continue
        [site] = item.ContentSequence
        [side] = site.ContentSequence
        key = (
            hd.sr.CodedConcept.from_dataset(side.ConceptCodeSequence[0]),
            hd.sr.CodedConcept.from_dataset(site.ConceptCodeSequence[0]),
        )
        found[key] = item.ConceptCodeSequence[0].CodeValue == codes.PRESENT.value
    return found


def test_validated_models_only_have_no_warning(tmp_path: Path) -> None:
    validated = [m for m in MODELS if m.status == "validated"]
    case = synthetic_case(DICOM / "02_cr_implicit_le_12bit.dcm", models=validated)
    case.result.pneumothorax_present = None  # pneumothorax model did not run
    del case.full["pneumothorax"]
    _, report, sr = _report(case, tmp_path)
    assert "DIAGNOSTIC" not in sr.SeriesDescription
    assert set(_groups(report)) == {"Right lung", "Left lung", "COVID-19 opacity"}


def test_inconsistent_inputs_raise_result_error() -> None:
    case = synthetic_case(DICOM / "02_cr_implicit_le_12bit.dcm")
    seg = build_seg(case.source, case.full, MODELS, device=DEVICE)
    case.result.severity_score = 9
    with pytest.raises(ResultError, match="0-6"):
        build_sr(case.source, seg, case.result, pixel_spacing_mm=None, device=DEVICE)
    case.result.severity_score = 1
    case.result.zone_fractions = [0.1, 0.2]
    with pytest.raises(ResultError, match="zone fractions"):
        build_sr(case.source, seg, case.result, pixel_spacing_mm=None, device=DEVICE)
    other = synthetic_case(DICOM / "03_cr_monochrome1_12bit.dcm")
    other.source.StudyInstanceUID = hd.UID()
    with pytest.raises(ResultError, match="study"):
        build_sr(other.source, seg, other.result, pixel_spacing_mm=None, device=DEVICE)
