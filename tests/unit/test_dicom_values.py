"""Patient/study values from lenient senders, brought to their DICOM form (node.dicom_values)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from node.dicom_values import COPIED_TYPE2, age_years, conform_patient_study, dicom_date, dicom_time, patient_sex


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("20261201", "20261201"),
        ("2026-12-01", "20261201"),
        ("2026.12.01", "20261201"),  # ACR-NEMA
        ("2026/12/01", "20261201"),
        (" 20261201 ", "20261201"),
        ("20261301", ""),  # no 13th month
        ("20260230", ""),
        ("1.12.2026", ""),
        ("unknown", ""),
        ("", ""),
        (None, ""),
    ],
)
def test_dates(raw: object, expected: str) -> None:
    assert dicom_date(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("101500", "101500"),
        ("101500.123456", "101500.123456"),
        ("1015", "1015"),
        ("10", "10"),
        ("10:15:00", "101500"),  # ACR-NEMA
        ("10:15:00.5", "101500.5"),
        ("251500", ""),
        ("106000", ""),
        ("10.15", ""),
        ("", ""),
    ],
)
def test_times(raw: str, expected: str) -> None:
    assert dicom_time(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("M", "M"), ("male", "M"), ("F", "F"), ("FEMALE", "F"), ("O", "O"), ("U", ""), ("", ""), (None, "")],
)
def test_sex(raw: object, expected: str) -> None:
    assert patient_sex(raw) == expected


def test_conform_fills_missing_type2_and_reports_each_change() -> None:
    ds = Dataset()
    ds.PatientName, ds.PatientID = "Doe^Jane", "P1"
    ds.StudyDate, ds.PatientSex = "2026-12-01", "female"
    changed = conform_patient_study(ds)
    assert all(k in ds for k in COPIED_TYPE2)
    assert (ds.PatientName, ds.PatientID, ds.StudyDate, ds.PatientSex, ds.StudyTime) == (
        "Doe^Jane",
        "P1",
        "20261201",
        "F",
        "",
    )
    assert "StudyDate '2026-12-01' -> '20261201'" in changed and "StudyTime missing" in changed
    assert conform_patient_study(ds) == []  # conformed: nothing left to change


@pytest.mark.parametrize(
    ("age", "born", "studied", "expected"),
    [
        ("034Y", "", "", 34.0),
        ("006M", "", "", 0.5),
        ("002W", "", "", 14 / 365.25),
        ("010D", "", "", 10 / 365.25),
        ("34y", "", "", 34.0),  # lenient senders
        ("", "20000301", "20180301", 18.0),  # 18 on the 18th birthday
        ("", "20000302", "20180301", 17 + 364 / 366),  # the day before
        ("", "2000-03-01", "2018.03.01", 18.0),
        ("", "20000229", "20180301", 18 + 1 / 366),  # born on 29 February: 18 from 28 February
        ("abc", "20100101", "20200101", 10.0),  # unreadable age: the dates decide
        ("000Y", "", "", None),  # a placeholder, not a newborn...
        ("000Y", "20230101", "20230701", 181 / 366),  # ...so the dates decide
        ("000D", "", "", 0.0),  # a newborn
        ("", "20200101", "20100101", None),  # born after the study: an error, not an age
        ("", "20100101", "", None),
        ("", "", "", None),
        (None, None, None, None),
    ],
)
def test_age_years(age: object, born: object, studied: object, expected: float | None) -> None:
    assert age_years(age, born, studied) == (pytest.approx(expected) if expected is not None else None)
