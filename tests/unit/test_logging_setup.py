"""Logs never carry patient identifiers, in plain or JSON form, whatever module logs them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from node.runtime.logging_setup import REDACTED, redact, setup_logging

PHI = ["Doe^Jane", "Müller^Hans^Peter", "PAT-00123", "19700101", "1970-01-01"]


@pytest.mark.parametrize(
    ("line", "kept"),
    [
        ("PatientName=Doe^Jane study 1.2.3", ["study 1.2.3"]),
        ("patient_id: PAT-00123, modality CR", ["modality CR"]),
        ("(0010,0010) Patient's Name                      PN: 'Doe^Jane'", ["(0010,0010)"]),
        ("(0010,0030) Patient's Birth Date                DA: '19700101'", ["(0010,0030)"]),
        ("received from Müller^Hans^Peter via AE PACS1", ["received from", "via AE PACS1"]),
        ("PatientBirthDate='19700101' PatientSex=F", ["PatientSex=F"]),
        ("DOB 1970-01-01, view PA", ["view PA"]),
        ("Patient's Name: Doe^Jane", []),
        ("OtherPatientIDs=[PAT-00123, X]", []),
    ],
)
def test_redact_removes_identifiers_and_keeps_the_rest(line: str, kept: list[str]) -> None:
    out = redact(line)
    assert REDACTED in out
    for phi in PHI:
        assert phi not in out, out
    for part in kept:
        assert part in out
    assert redact(out) == out  # idempotent


@pytest.mark.parametrize(
    "line",
    [
        "association 12 from STORESCU@127.0.0.1:5555 accepted (3 contexts)",
        "instance 1.2.840.113619.2.55.3.1234 stored: 0x0000, rule chest-frontal",
        "C-STORE status 0xA700: 900 MB free, below the 1024 MB watermark",
        "study date 20240101 accession ACC123",
    ],
)
def test_redact_leaves_operational_lines_alone(line: str) -> None:
    assert redact(line) == line


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, logging.Logger]]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.level
    handler = setup_logging("DEBUG", json_logs=True, stream=stream)
    yield stream, logging.getLogger("node.test")
    root.removeHandler(handler)
    root.setLevel(saved)


def test_json_lines_with_args_extras_and_exceptions_are_redacted(captured: tuple[io.StringIO, logging.Logger]) -> None:
    stream, log = captured
    log.info("routing %s for PatientName=%s", "1.2.3", "Doe^Jane", extra={"patient": "Doe^Jane", "n": 3})
    try:
        raise ValueError("bad value for PatientID: PAT-00123")
    except ValueError:
        log.exception("ingest failed for Müller^Hans^Peter")
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [x["level"] for x in lines] == ["INFO", "ERROR"]
    assert lines[0]["msg"] == f"routing 1.2.3 for PatientName={REDACTED}"
    assert lines[0]["patient"] == REDACTED and lines[0]["n"] == 3 and lines[0]["logger"] == "node.test"
    assert "ValueError" in lines[1]["exc"]
    text = stream.getvalue()
    for phi in PHI:
        assert phi not in text


def test_plain_format_is_redacted_too() -> None:
    stream = io.StringIO()
    handler = setup_logging("INFO", json_logs=False, stream=stream)
    try:
        logging.getLogger("node.test").warning("duplicate from Doe^Jane")
    finally:
        logging.getLogger().removeHandler(handler)
    assert "Doe^Jane" not in stream.getvalue() and "WARNING" in stream.getvalue()
