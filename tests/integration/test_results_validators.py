"""SEG and SR of every kind of source pass PixelMed's validators (0 errors) and dciodvfy (0 errors, 0 warnings),
and carry the IHE AI Results (AIR) content: Contributing Equipment per model, shared tracking UIDs, the
analysis start as Content Date/Time, standard codes only.

All objects go through one PixelMed run (its stylesheets take most of a run to compile).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.results import codes
from node.results.common import DeviceInfo, model_device_uid
from node.results.seg import build_seg, tracking_uids
from node.results.sr import PriorComparison, build_sr
from node.results.study_sr import ImageRef, ReportRef, StudySummary, build_study_sr
from tests.support.paths import shared_data
from tests.support.synthetic_results import MODELS, PRIOR, synthetic_case
from tests.support.validators import Report, dciodvfy, pixelmed
from workers.api import ModelInfo

DICOM = shared_data() / "dicom"
STARTED = datetime(2026, 12, 1, 8, 30, 15, 250000, tzinfo=UTC)
EXPERIMENTAL = [replace(m, status="experimental", performance=m.performance or "weak here") for m in MODELS]

#: name -> (source file, models, prior)
CASES: dict[str, tuple[str, list[ModelInfo] | None, PriorComparison | None]] = {
    "cr": ("01_cr_explicit_le_mono2_12bit_2048x2500.dcm", None, None),
    "monochrome1": ("03_cr_monochrome1_12bit.dcm", None, None),
    "dx": ("04_dx_for_presentation_14bit_voilut.dcm", None, None),
    "jpeg": ("13_cr_jpeg_extended_12bit.dcm", None, None),
    "no-spacing": ("22_sc_chest_8bit_gray.dcm", None, None),
    "experimental": ("17_cr_j2k_lossless_12bit.dcm", EXPERIMENTAL, None),
    "prior": ("02_cr_implicit_le_12bit.dcm", None, PRIOR),
}


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """'<case>/seg' and '<case>/sr' -> file, for every case."""
    out = tmp_path_factory.mktemp("results")
    files = {}
    for name, (source, models, prior) in CASES.items():
        case = synthetic_case(DICOM / source, models=models)
        seg = build_seg(case.source, case.full, case.result.models, device=DeviceInfo(), started=STARTED)
        sr = build_sr(
            case.source,
            seg,
            case.result,
            pixel_spacing_mm=case.prepared.prepared_pixel_spacing_mm,
            device=DeviceInfo(),
            notes=case.prepared.notes,
            prior=prior,
            started=STARTED,
        )
        for kind, obj in (("seg", seg), ("sr", sr)):
            files[f"{name}/{kind}"] = out / f"{name}-{kind}.dcm"
            obj.save_as(files[f"{name}/{kind}"])
    files["study/sr"] = out / "study-sr.dcm"
    study_summary().save_as(files["study/sr"], enforce_file_format=True)
    return files


def study_summary() -> Dataset:
    """Revision 2 of a study summary SR: two images (the severity on one, a pneumothorax on the other), a
    prior, experimental models, the revision it replaces."""
    header = pydicom.dcmread(DICOM / CASES["cr"][0], stop_before_pixels=True)
    first = ImageRef(str(header.SOPClassUID), str(header.SOPInstanceUID), str(header.SeriesInstanceUID))
    late = ImageRef(str(header.SOPClassUID), generate_uid(), generate_uid())
    summary = StudySummary(
        revision=2,
        level="critical",
        reasons=["pneumothorax: probability 0.93 >= 0.5", "severe-opacity: severity 5 >= 4"],
        images=[first, late],
        severity_score=5,
        severity_image=first,
        severity_models=EXPERIMENTAL,
        prior=PRIOR,
        pneumothorax_present=True,
        pneumothorax_probability=0.93,
        pneumothorax_side="left",
        pneumothorax_image=late,
        pneumothorax_models=EXPERIMENTAL,
        rules=["pneumothorax: critical when pneumothorax_probability_gte 0.5"],
    )
    return build_study_sr(
        header,
        summary,
        device=DeviceInfo(),
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        replaces=ReportRef(generate_uid(), generate_uid()),
        decided=STARTED,
    )


@pytest.fixture(scope="module")
def pixelmed_reports(objects: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Report]:
    broken = tmp_path_factory.mktemp("broken") / "seg.dcm"
    ds = pydicom.dcmread(objects["cr/seg"])
    del ds.SegmentSequence[0].SegmentLabel  # Type 1 in the Segment Description macro
    ds.save_as(broken)
    keys = [*objects, "broken"]
    return dict(zip(keys, pixelmed([*objects.values(), broken]), strict=True))


KEYS = [f"{c}/{k}" for c in CASES for k in ("seg", "sr")] + ["study/sr"]


@pytest.mark.parametrize("key", KEYS)
def test_pixelmed_finds_no_error(key: str, pixelmed_reports: dict[str, Report]) -> None:
    report = pixelmed_reports[key]
    assert report.errors == [], report


def test_pixelmed_check_can_fail(pixelmed_reports: dict[str, Report]) -> None:
    assert any("SegmentLabel" in e for e in pixelmed_reports["broken"].errors), pixelmed_reports["broken"]


@pytest.mark.parametrize("key", KEYS)
def test_dciodvfy_no_error_no_warning(key: str, objects: dict[str, Path]) -> None:
    report = dciodvfy(objects[key])
    assert (report.errors, report.warnings) == ([], []), report


def test_contributing_equipment_names_each_model(objects: dict[str, Path]) -> None:
    seg, sr = (pydicom.dcmread(objects[f"cr/{k}"]) for k in ("seg", "sr"))
    for ds in (seg, sr):
        items = {str(i.ManufacturerModelName): i for i in ds.ContributingEquipmentSequence}
        assert set(items) == {m.name for m in MODELS}
        for model in MODELS:
            item = items[model.name]
            purpose = item.PurposeOfReferenceCodeSequence[0]
            assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
                "Newcode1",
                "99IHE",
                "Processing Algorithm",
            )
            assert item.Manufacturer == "cxr-node" and item.SoftwareVersions == model.version
            assert item.DeviceUID == model_device_uid(model)
            assert model.sha256 in item.ContributionDescription
            assert item.ContributionDateTime == "20261201083015.250000+0000"


def test_device_uid_follows_the_weights() -> None:
    lung = MODELS[0]
    same = ModelInfo(lung.name, "another version label", lung.sha256, "experimental", "other")
    retrained = ModelInfo(lung.name, lung.version, "d" * 64, lung.status, lung.architecture)
    assert model_device_uid(lung) == model_device_uid(same)  # stable: only the weights decide
    assert model_device_uid(lung) != model_device_uid(retrained)
    assert pydicom.uid.UID(model_device_uid(lung)).is_valid and model_device_uid(lung).startswith("2.25.")


def test_content_datetime_is_the_analysis_start(objects: dict[str, Path]) -> None:
    local = STARTED.astimezone()
    for key in ("cr/seg", "cr/sr"):
        ds = pydicom.dcmread(objects[key], stop_before_pixels=True)
        assert (ds.ContentDate, ds.ContentTime) == (local.strftime("%Y%m%d"), local.strftime("%H%M%S.%f")), key


def test_sr_tracks_each_finding_with_the_segment_uid(objects: dict[str, Path]) -> None:
    seg, sr = (pydicom.dcmread(objects[f"cr/{k}"]) for k in ("seg", "sr"))
    in_seg = tracking_uids(seg)
    in_sr = [str(e.value) for e in sr.iterall() if e.keyword == "UID"]  # TID 4108 Tracking Unique Identifier
    assert set(in_seg.values()) <= set(in_sr)
    assert len(set(in_seg.values())) == len(in_seg) == 4


def test_only_standard_codes(objects: dict[str, Path]) -> None:
    """No private coding scheme: every designator is one dciodvfy and PixelMed know."""
    for key, path in objects.items():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        used = {str(e.value) for e in ds.iterall() if e.keyword == "CodingSchemeDesignator"}
        assert used <= {"DCM", "SCT", "UCUM", "UMLS", "RFC5646", "99IHE"}, key  # RFC5646: language of content
        if key.endswith("/sr"):
            declared = {str(i.CodingSchemeDesignator) for i in ds.CodingSchemeIdentificationSequence}
            assert declared == used & {"DCM", "SCT", "UCUM", "UMLS"}, key
    algorithm = pydicom.dcmread(objects["cr/seg"]).SegmentSequence[0]
    assert algorithm.SegmentAlgorithmType == "AUTOMATIC" and algorithm.SegmentAlgorithmName == "lung"
    family = algorithm.SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0]
    assert family.CodeValue == codes.ARTIFICIAL_INTELLIGENCE.value
