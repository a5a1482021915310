"""Patient and study values as real senders write them, brought to the form DICOM and our peers require.

Senders are lenient where the node cannot be: many real files carry dates as `1960-01-01` or the
ACR-NEMA `1960.01.01`, times as `10:15:00`, Patient's Sex as `MALE`, or leave Type 2 attributes out
altogether. The node stores every received file unchanged; what it *writes* (SEG, SR, overlay, HL7,
FHIR, the audit columns used to find priors) must be valid, and highdicom and fhir.resources refuse
such values outright. So every value the node copies from a source header goes through here: a legacy
form is rewritten to the standard one (same date, same time), an unreadable one becomes empty (Type 2:
"unknown"), never an invented value. Ingest, results and triage share these rules so that a study's
date is the same everywhere.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime

from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

#: Patient and study attributes every result object copies from its source. All are Type 2 in an image
#: (present, may be empty) yet often absent from real-world files; highdicom reads each of them.
COPIED_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)

_DATE = re.compile(r"(\d{4})[-./]?(\d{2})[-./]?(\d{2})")
_TIME = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(\.\d{1,6})?)?)?")
_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}


def dicom_date(value: object) -> str:
    """A DA value (YYYYMMDD) for a date written as YYYYMMDD, YYYY-MM-DD, YYYY.MM.DD or YYYY/MM/DD; else ""."""
    found = _DATE.fullmatch(str(value or "").strip())
    if found is None:
        return ""
    text = "".join(found.groups())
    try:
        datetime.strptime(text, "%Y%m%d")
    except ValueError:  # 20261301: digits, but no date
        return ""
    return text


def dicom_time(value: object) -> str:
    """A TM value (HH[MM[SS[.F…]]]) for a time written so or with colons (ACR-NEMA HH:MM:SS); else ""."""
    found = _TIME.fullmatch(str(value or "").strip())
    if found is None:
        return ""
    hours, minutes, seconds, fraction = found.groups()
    if int(hours) > 23 or (minutes and int(minutes) > 59) or (seconds and int(seconds) > 60):
        return ""
    return hours + (minutes or "") + (seconds or "") + (fraction or "")


_AGE = re.compile(r"(\d{1,3})\s*([DWMY])", re.IGNORECASE)
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def age_years(patient_age: object, birth_date: object = "", study_date: object = "") -> float | None:
    """The patient's age in years at the study: Patient's Age (AS, "034Y", "006M"; also the lenient
    "34Y" or "34 y"), else Study Date minus Patient's Birth Date; None when neither can be read.

    A birth date after the study date is an error in the header, not an age: None. "000Y" is a common
    placeholder for "unknown" (a baby's age is written in days, weeks or months), so the dates decide.
    """
    found = _AGE.fullmatch(str(patient_age or "").strip())
    if found is not None and (int(found.group(1)) or found.group(2).upper() != "Y"):
        return int(found.group(1)) * _AGE_UNIT_YEARS[found.group(2).upper()]
    born_text, studied_text = dicom_date(birth_date), dicom_date(study_date)
    if not born_text or not studied_text:
        return None
    born, studied = datetime.strptime(born_text, "%Y%m%d"), datetime.strptime(studied_text, "%Y%m%d")
    if studied < born:
        return None
    # Completed years as people count them (18 on the 18th birthday), plus the part of the year since.
    years = studied.year - born.year - ((studied.month, studied.day) < (born.month, born.day))
    try:
        birthday = born.replace(year=born.year + years)
    except ValueError:  # born on 29 February: the birthday is 28 February in other years
        birthday = born.replace(year=born.year + years, day=28)
    return years + (studied - birthday).days / 366


def patient_sex(value: object) -> str:
    """M, F or O for the ways senders write them (`MALE`, `f`); "" (unknown) for anything else."""
    return _SEX.get(str(value or "").strip().upper(), "")


def conform_patient_study(ds: Dataset) -> list[str]:
    """Make the copied patient/study attributes of `ds` valid in place; returns what was changed.

    Missing Type 2 attributes become empty; dates, times and sex are brought to their standard form
    (or emptied when unreadable). Names and identifiers are kept as sent.
    """
    changed = []
    for keyword in COPIED_TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
            changed.append(f"{keyword} missing")
    for keyword, conform in (
        ("PatientBirthDate", dicom_date),
        ("StudyDate", dicom_date),
        ("StudyTime", dicom_time),
        ("PatientSex", patient_sex),
    ):
        raw = str(ds[keyword].value or "").strip()
        fixed = conform(raw)
        if fixed != raw:
            ds[keyword].value = fixed
            changed.append(f"{keyword} {raw!r} -> {fixed!r}")
    return changed
