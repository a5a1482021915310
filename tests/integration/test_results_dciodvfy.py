"""SEG, SR and the overlay pass dicom3tools' dciodvfy with no errors and no warnings, on the kinds of source
a PACS sends (tests/support/validators.py sets apart the one known dciodvfy gap: Device UID in Contributing
Equipment, which IHE AIR requires)."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.results.common import DeviceInfo
from node.results.overlay import build_overlay
from node.results.seg import build_seg
from node.results.sr import build_sr
from tests.support.paths import shared_data
from tests.support.synthetic_results import synthetic_case
from tests.support.validators import dciodvfy, dciodvfy_errors

DICOM = shared_data() / "dicom"
SOURCES = [
    "01_cr_explicit_le_mono2_12bit_2048x2500.dcm",  # CR, ImagerPixelSpacing
    "03_cr_monochrome1_12bit.dcm",
    "04_dx_for_presentation_14bit_voilut.dcm",  # DX
    "11_cr_pixel_padding_value0.dcm",
    "13_cr_jpeg_extended_12bit.dcm",  # JPEG source
    "17_cr_j2k_lossless_12bit.dcm",
    "21_cr_explicit_big_endian_12bit.dcm",
    "22_sc_chest_8bit_gray.dcm",  # SC without spacing
    "23_sc_chest_rgb_annotated.dcm",  # RGB SC
    "24_cr_no_preamble_no_meta_implicit_le.dcm",
]

__all__ = ["dciodvfy_errors"]  # other tests import it from here


def assert_clean(path: Path, what: str) -> None:
    report = dciodvfy(path)
    assert (report.errors, report.warnings) == ([], []), f"{what}: {report}"


@pytest.mark.parametrize("name", SOURCES, ids=[n[:2] for n in SOURCES])
def test_results_are_valid_dicom(name: str, tmp_path: Path) -> None:
    case = synthetic_case(DICOM / name)
    device = DeviceInfo()
    seg = build_seg(case.source, case.full, case.result.models, device=device)
    sr = build_sr(
        case.source,
        seg,
        case.result,
        pixel_spacing_mm=case.prepared.prepared_pixel_spacing_mm,
        device=device,
        notes=case.prepared.notes,
    )
    overlay = build_overlay(
        case.source,
        case.prepared.pixels,
        case.small,
        case.result.models,
        device=device,
        pixel_spacing_mm=case.prepared.prepared_pixel_spacing_mm,
    )
    for kind, obj in (("seg", seg), ("sr", sr), ("overlay", overlay)):
        out = tmp_path / f"{kind}.dcm"
        obj.save_as(out)
        assert_clean(out, f"{kind} from {name}")


def test_empty_pneumothorax_segment_is_valid(tmp_path: Path) -> None:
    case = synthetic_case(DICOM / "02_cr_implicit_le_12bit.dcm", pneumothorax=False)
    seg = build_seg(case.source, case.full, case.result.models, device=DeviceInfo())
    seg.save_as(tmp_path / "seg.dcm")
    sr = build_sr(case.source, seg, case.result, pixel_spacing_mm=None, device=DeviceInfo())
    sr.save_as(tmp_path / "sr.dcm")
    assert_clean(tmp_path / "seg.dcm", "seg")
    assert_clean(tmp_path / "sr.dcm", "sr")


def test_the_checker_finds_errors(tmp_path: Path) -> None:
    """The check can fail: a SEG without its Patient Orientation is reported."""
    case = synthetic_case(DICOM / "02_cr_implicit_le_12bit.dcm")
    seg = build_seg(case.source, case.full, case.result.models, device=DeviceInfo())
    del seg.PatientOrientation
    seg.save_as(tmp_path / "bad.dcm")
    assert dciodvfy_errors(tmp_path / "bad.dcm")
