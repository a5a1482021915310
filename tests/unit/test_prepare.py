"""node.analysis.prepare on every file of shared/data/dicom: analysable pixels look like their JSRT source,
broken ones raise PrepareError (never another exception), and masks map back to the source grid."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from node.analysis.prepare import Prepared, PrepareError, masks_to_source, prepare
from tests.support.paths import shared_data

DICOM = shared_data() / "dicom"
JSRT = shared_data() / "lung" / "jsrt" / "images"
MANIFEST = list(csv.DictReader((DICOM / "manifest.csv").open()))


def _decodable(row: dict[str, str]) -> bool:
    """The manifest's `decode` column says FAIL / no pixel data / empty; multi-frame is refused on purpose."""
    return row["decode"].startswith("OK") and "multi-frame" not in row["analysable"]


def _reference(row: dict[str, str], prepared: Prepared) -> np.ndarray:
    """The JSRT source as the test-set tool placed it on the source grid, then cropped/resized like prepare."""
    src = Image.open(JSRT / f"{row['source_image'].split()[-1]}.png").convert("L")
    rows, cols = int(row["rows"]), int(row["cols"])
    side = max(rows, cols)  # case 01: upscaled to a square, then centre-cropped to fewer columns
    grid = np.asarray(src.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float64)
    top, left = (side - rows) // 2, (side - cols) // 2
    grid = grid[top : top + rows, left : left + cols]
    r0, c0, r1, c1 = prepared.crop
    if (r0, c0, r1, c1) != (0, 0, rows, cols):  # padded case: the source was fitted into the box
        grid = np.asarray(src.resize((c1 - c0, r1 - r0), Image.Resampling.BICUBIC), dtype=np.float64)
    else:
        grid = grid[r0:r1, c0:c1]
    return np.asarray(
        Image.fromarray(grid.astype(np.float32), mode="F").resize(
            (prepared.cols, prepared.rows), Image.Resampling.BILINEAR
        )
    )


@pytest.mark.parametrize("row", MANIFEST, ids=[r["file"][:2] for r in MANIFEST])
def test_every_manifest_file(row: dict[str, str]) -> None:
    path = DICOM / row["file"]
    if not _decodable(row):
        with pytest.raises(PrepareError) as err:
            prepare(path)
        assert str(err.value)
        return
    prepared = prepare(path)
    assert prepared.pixels.dtype == np.uint8 and prepared.pixels.ndim == 2
    assert max(prepared.pixels.shape) == 1024
    assert (prepared.source_rows, prepared.source_cols) == (int(row["rows"]), int(row["cols"]))
    r0, c0, r1, c1 = prepared.crop
    assert prepared.pixels.shape[0] / prepared.pixels.shape[1] == pytest.approx((r1 - r0) / (c1 - c0), rel=0.01)
    assert prepared.pixels.std() > 20, "an image with contrast, not a flat field"
    if row["source_image"]:
        corr = np.corrcoef(_reference(row, prepared).ravel(), prepared.pixels.astype(np.float64).ravel())[0, 1]
        assert corr > 0.9, f"correlation with the JSRT source {corr:.3f}"


def test_lungs_darker_than_mediastinum() -> None:
    """MONOCHROME1 is inverted: air in the lungs is dark, the spine/heart column bright."""
    for name in (
        "02_cr_implicit_le_12bit.dcm",
        "03_cr_monochrome1_12bit.dcm",
        "10_cr_signed_12bit_pixelrep1.dcm",
        "06_cr_modality_lut_rescale_slope2_int-1024.dcm",
    ):
        px = prepare(DICOM / name).pixels.astype(np.float64)
        h, w = px.shape
        band = px[int(h * 0.3) : int(h * 0.6)]
        lungs = np.r_[band[:, int(w * 0.2) : int(w * 0.35)].ravel(), band[:, int(w * 0.65) : int(w * 0.8)].ravel()]
        mediastinum = band[:, int(w * 0.45) : int(w * 0.55)]
        assert lungs.mean() + 20 < mediastinum.mean(), name


def test_monochrome1_matches_monochrome2_source() -> None:
    """Cases 03 (MONOCHROME1) and 09 (8-bit MONOCHROME2) come from the same JSRT image."""
    mono1 = prepare(DICOM / "03_cr_monochrome1_12bit.dcm").pixels.astype(np.float64)
    mono2 = prepare(DICOM / "09_cr_8bit_alloc8.dcm").pixels.astype(np.float64)
    assert np.corrcoef(mono1.ravel(), mono2.ravel())[0, 1] > 0.98


def test_spacing_and_notes() -> None:
    cr = prepare(DICOM / "01_cr_explicit_le_mono2_12bit_2048x2500.dcm")
    assert cr.pixel_spacing_mm == (0.139, 0.139) and cr.spacing_attribute == "ImagerPixelSpacing"
    assert cr.pixels.shape == (1024, round(2048 * 1024 / 2500))
    assert cr.prepared_pixel_spacing_mm is not None
    assert cr.prepared_pixel_spacing_mm[0] == pytest.approx(0.139 * 2500 / 1024)
    ct = prepare(DICOM / "26_ct_single_slice_thorax.dcm")
    assert ct.spacing_attribute == "PixelSpacing"
    sc = prepare(DICOM / "22_sc_chest_8bit_gray.dcm")
    assert sc.pixel_spacing_mm is None and not sc.has_spacing and "secondary capture" in sc.notes
    rgb = prepare(DICOM / "23_sc_chest_rgb_annotated.dcm")
    assert "RGB converted to luma" in rgb.notes
    assert "lossy source" in prepare(DICOM / "18_cr_j2k_lossy_12bit.dcm").notes
    assert "MONOCHROME1 inverted" in prepare(DICOM / "03_cr_monochrome1_12bit.dcm").notes


def test_pixel_padding_is_cropped_and_masks_return_to_the_full_grid() -> None:
    prepared = prepare(DICOM / "11_cr_pixel_padding_value0.dcm")
    assert prepared.crop == (112, 88, 944, 968)  # manifest: image in rows 112..943, cols 88..967
    assert "pixel padding cropped" in prepared.notes
    full = masks_to_source(np.ones(prepared.pixels.shape, dtype=bool), prepared)
    assert full.shape == (1024, 1024)
    raw = pydicom.dcmread(DICOM / "11_cr_pixel_padding_value0.dcm").pixel_array
    np.testing.assert_array_equal(full, raw != 0)


def test_masks_to_source_round_trip() -> None:
    """A mask drawn on the source grid, taken to the model grid by nearest and back, is nearly unchanged."""
    prepared = prepare(DICOM / "01_cr_explicit_le_mono2_12bit_2048x2500.dcm")
    yy, xx = np.mgrid[: prepared.source_rows, : prepared.source_cols]
    disc = (yy - 1200) ** 2 + (xx - 700) ** 2 < 400**2
    small = np.asarray(Image.fromarray(disc).resize((prepared.cols, prepared.rows), Image.Resampling.NEAREST))
    back = masks_to_source(small, prepared)
    assert back.shape == disc.shape and back.dtype == bool
    assert (back ^ disc).sum() / disc.sum() < 0.02
    with pytest.raises(ValueError):
        masks_to_source(np.zeros((5, 5), dtype=bool), prepared)


def test_dataset_input_and_bare_dataset(tmp_path: Path) -> None:
    """A Dataset (what the SCP holds) works like a path, and a data set without file meta is decoded."""
    ds = pydicom.dcmread(DICOM / "24_cr_no_preamble_no_meta_implicit_le.dcm", force=True)
    assert "TransferSyntaxUID" not in getattr(ds, "file_meta", {})
    np.testing.assert_array_equal(
        prepare(ds).pixels, prepare(DICOM / "24_cr_no_preamble_no_meta_implicit_le.dcm").pixels
    )
    assert "TransferSyntaxUID" not in getattr(ds, "file_meta", {}), "the caller's data set is not modified"


def test_unreadable_inputs(tmp_path: Path) -> None:
    missing = tmp_path / "missing.dcm"
    with pytest.raises(PrepareError, match="cannot read"):
        prepare(missing)
    ds = pydicom.dcmread(DICOM / "02_cr_implicit_le_12bit.dcm")
    ds.PixelPaddingValue = int(ds.pixel_array.min())
    ds.PixelPaddingRangeLimit = int(ds.pixel_array.max())
    with pytest.raises(PrepareError, match="Pixel Padding"):
        prepare(ds)


def test_palette_color_is_converted_to_luma() -> None:
    """A PALETTE COLOR image with a grey palette prepares like its MONOCHROME2 original."""
    ds = pydicom.dcmread(DICOM / "09_cr_8bit_alloc8.dcm")
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ramp = (np.arange(256, dtype="<u2") * 257).tobytes()  # 16-bit entries, 0..65535
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", ramp)
    palette = prepare(ds)
    assert "PALETTE COLOR converted to luma" in palette.notes
    grey = prepare(DICOM / "09_cr_8bit_alloc8.dcm").pixels.astype(np.float64)
    assert np.corrcoef(palette.pixels.astype(np.float64).ravel(), grey.ravel())[0, 1] > 0.99
    ds.RedPaletteColorLookupTableDescriptor = [16, 0, 16]  # descriptor and data disagree
    with pytest.raises(PrepareError):
        prepare(ds)


def test_malformed_attribute_values_are_final_prepare_errors(tmp_path: Path) -> None:
    from tests.support.poison import poison_files

    for name, path in poison_files(tmp_path).items():
        with pytest.raises(PrepareError):
            prepare(path)
        assert name
