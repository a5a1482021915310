"""The validator defects tests/support/validators.py sets apart stay narrow: each is tolerated only in the
situation that makes it a defect of the validator, never for the same message in a faulty object."""

from __future__ import annotations

from pydicom.dataset import Dataset

from tests.support.validators import _pixelmed_defect

LATERALITY = "Error: GeneralSeriesModule/Laterality/: : Missing conditional attribute"
DERIVATION = (
    "Error: DerivationImageMacro/DerivationImageSequence/: SharedFunctionalGroupsSequence/Item[1]/: "
    "Missing required sequence attribute (Type 2)"
)
TID1411 = (
    'Error: Template 1411 VolumetricROIMeasurements/[Row 1] CONTAINER (125007,DCM,"Measurement Group")/'
    '[Row 7] IMAGE (121191,DCM,"Referenced Segment"): within 1.1.2: /CONTAINER (126000,DCM,"Imaging '
    'Measurement Report")/CONTAINER (125007,DCM,"Measurement Group"): Missing conditional content item'
)


def _code(value: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", value
    return item


def _item(value_type: str, concept: str, children: list[Dataset] | None = None) -> Dataset:
    item = Dataset()
    item.ValueType = value_type
    item.ConceptNameCodeSequence = [_code(concept)]
    if children:
        item.ContentSequence = children
    return item


def test_laterality_only_when_absent_for_a_chest() -> None:
    ds = Dataset()
    ds.BodyPartExamined = "CHEST"
    assert _pixelmed_defect(LATERALITY, ds)
    ds.Laterality = "L"  # present and still reported: a real finding
    assert not _pixelmed_defect(LATERALITY, ds)
    knee = Dataset()
    knee.BodyPartExamined = "KNEE"  # paired: the missing Laterality is an error
    assert not _pixelmed_defect(LATERALITY, knee)


def test_derivation_only_when_every_frame_has_it() -> None:
    ds = Dataset()
    frames = [Dataset(), Dataset()]
    frames[0].DerivationImageSequence = [Dataset()]
    ds.PerFrameFunctionalGroupsSequence = frames
    assert not _pixelmed_defect(DERIVATION, ds)
    frames[1].DerivationImageSequence = [Dataset()]
    assert _pixelmed_defect(DERIVATION, ds)


def test_context_group_only_when_extensible() -> None:
    line = 'Error: ...: Code (399208008,SCT,"Plain chest X-ray") not found in context group {}'
    assert _pixelmed_defect(line.format(100), Dataset())  # Quantitative Diagnostic Imaging Procedures: extensible
    assert not _pixelmed_defect(line.format(230), Dataset())  # Yes/No: not extensible


def test_tid1411_rows_only_for_a_group_without_roi_reference() -> None:
    plain = _item("CONTAINER", "125007", [_item("TEXT", "112039"), _item("NUM", "246112005")])
    roi = _item("CONTAINER", "125007", [_item("TEXT", "112039"), _item("IMAGE", "121191")])
    ds = Dataset()
    ds.ContentSequence = [_item("CONTAINER", "126010", [roi, plain])]
    assert _pixelmed_defect(TID1411, ds)  # 1.1.2 = the plain (TID 1501) group
    assert not _pixelmed_defect(TID1411.replace("within 1.1.2", "within 1.1.1"), ds)
    assert not _pixelmed_defect(TID1411.replace("within 1.1.2", "within 1.1.9"), ds)
    assert not _pixelmed_defect("Error: something else entirely", ds)
