"""The SR's comparison with the patient's prior: the prior's severity in its own group at its own time point
(TID 1501/1502), the prior image in the Pertinent Other Evidence Sequence; still valid for dciodvfy."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom

from node.results import codes
from node.results.common import DeviceInfo
from node.results.seg import build_seg
from node.results.sr import PRIOR_TIME_POINT, build_sr
from tests.support.paths import shared_data
from tests.support.synthetic_results import PRIOR, synthetic_case
from tests.support.validators import dciodvfy


def test_sr_carries_the_comparison_and_stays_valid(tmp_path: Path) -> None:
    case = synthetic_case(shared_data() / "dicom" / "02_cr_implicit_le_12bit.dcm")
    seg = build_seg(case.source, case.full, case.result.models, device=DeviceInfo())
    sr = build_sr(
        case.source,
        seg,
        case.result,
        pixel_spacing_mm=case.prepared.prepared_pixel_spacing_mm,
        device=DeviceInfo(),
        prior=PRIOR,
    )
    out = tmp_path / "sr.dcm"
    sr.save_as(out)
    report = dciodvfy(out)
    assert (report.errors, report.warnings) == ([], []), report
    back = hd.sr.srread(out)
    measurement_report = hd.sr.MeasurementReport.from_sequence([back])
    [opacity] = [
        g
        for g in measurement_report.get_volumetric_roi_measurement_groups()
        if str(g.tracking_identifier) == "COVID-19 opacity"
    ] or [None]
    assert opacity is not None
    assert case.result.severity_score is not None
    assert float(opacity.get_measurements(name=codes.SEVERITY)[0].value) == case.result.severity_score
    [prior] = measurement_report.get_image_measurement_groups()
    assert str(prior.tracking_identifier) == "Severity of the prior study (2026-11-20)"
    assert float(prior.get_measurements(name=codes.SEVERITY)[0].value) == 1
    time_point = [
        str(e.value)
        for e in prior[0].iterall()
        if e.keyword == "TextValue" and str(e.value).startswith(PRIOR_TIME_POINT)
    ]
    assert time_point == [f"{PRIOR_TIME_POINT} 2026-11-20"]
    ds = pydicom.dcmread(out)
    [study] = ds.PertinentOtherEvidenceSequence
    assert study.StudyInstanceUID == PRIOR.study_instance_uid
    assert study.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == PRIOR.sop_instance_uid
