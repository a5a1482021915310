"""The study summary SR builder: valid on construction, explicit errors, what it says about its models."""

from __future__ import annotations

import dataclasses

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.results.common import DeviceInfo, ResultError
from node.results.sr import EXPERIMENTAL_COMMENT
from node.results.study_sr import ImageRef, StudySummary, build_study_sr
from tests.support.paths import dicom_dir
from workers.api import ModelInfo

HEADER = pydicom.dcmread(dicom_dir() / "02_cr_implicit_le_12bit.dcm", stop_before_pixels=True)
IMAGE = ImageRef(str(HEADER.SOPClassUID), str(HEADER.SOPInstanceUID), str(HEADER.SeriesInstanceUID))
VALIDATED = [ModelInfo(n, "2", n[0] * 64, "validated", "unet") for n in ("lung", "opacity", "pneumothorax")]
SUMMARY = StudySummary(
    revision=1,
    level="urgent",
    reasons=["severe-opacity: severity 5 >= 4"],
    images=[IMAGE],
    severity_score=5,
    severity_image=IMAGE,
    severity_models=VALIDATED,
    pneumothorax_present=False,
    pneumothorax_probability=0.1,
    pneumothorax_image=IMAGE,
    pneumothorax_models=VALIDATED,
)


def build(summary: StudySummary) -> pydicom.Dataset:
    return build_study_sr(
        HEADER, summary, device=DeviceInfo(), series_instance_uid=generate_uid(), sop_instance_uid=generate_uid()
    )


def texts(ds: pydicom.Dataset) -> list[str]:
    found: list[str] = []

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if "TextValue" in item:
                found.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return found


def test_validated_models_make_a_report_without_the_warning() -> None:
    ds = build(SUMMARY)
    assert ds.SeriesDescription == "AI chest X-ray study summary" and ds.InstanceNumber == 1
    assert EXPERIMENTAL_COMMENT not in texts(ds)
    assert "Triage level: urgent (revision 1)" in texts(ds)
    assert {str(i.ManufacturerModelName) for i in ds.ContributingEquipmentSequence} == {"opacity", "pneumothorax"}


def test_findings_whose_models_were_not_recorded_say_not_for_diagnostic_use() -> None:
    ds = build(dataclasses.replace(SUMMARY, severity_models=[], pneumothorax_models=[]))
    assert texts(ds).count(EXPERIMENTAL_COMMENT) == 2
    assert ds.SeriesDescription.endswith("NOT FOR DIAGNOSTIC USE")
    purposes = {str(i.PurposeOfReferenceCodeSequence[0].CodeValue) for i in ds.ContributingEquipmentSequence}
    assert "Newcode1" not in purposes  # no model to name (highdicom's own items stay)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"revision": 0}, "revisions count from 1"),
        ({"images": []}, "at least one analysed image"),
        ({"severity_image": ImageRef(IMAGE.sop_class_uid, "1.2.3", "1.2.4")}, "not among the study's"),
        ({"severity_score": 7}, "needs its image and a value in 0-6"),
        ({"pneumothorax_image": None}, "a pneumothorax finding needs its image"),
    ],
)
def test_inconsistent_summaries_are_refused(change: dict[str, object], message: str) -> None:
    with pytest.raises(ResultError, match=message):
        build(dataclasses.replace(SUMMARY, **change))  # type: ignore[arg-type]
