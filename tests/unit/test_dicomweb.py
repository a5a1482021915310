"""STOW-RS pieces without a server: media types, the streaming part reader, the response encodings, the
destination settings."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree

import pytest
from pydicom.dataset import Dataset

from node.dicomweb.multipart import (
    BodyTooLarge,
    MalformedBody,
    PartSpooler,
    UnsupportedMediaType,
    stow_boundary,
)
from node.dicomweb.response import (
    InstanceResult,
    accepts_xml,
    http_status,
    response_dataset,
    to_json,
    to_xml,
)
from node.dicomweb.tokens import bearer_token
from node.runtime.config import AEEntry


def test_media_types() -> None:
    assert stow_boundary('multipart/related; type="application/dicom"; boundary="a b"') == b"a b"
    assert stow_boundary("Multipart/Related; boundary=XyZ") == b"XyZ"  # type defaults to application/dicom
    for bad in (
        "",
        "application/dicom",
        "multipart/form-data; boundary=x",
        'multipart/related; type="application/dicom+xml"; boundary=x',
    ):
        with pytest.raises(UnsupportedMediaType):
            stow_boundary(bad)
    with pytest.raises(MalformedBody):
        stow_boundary('multipart/related; type="application/dicom"')


def _spool(tmp_path: Path, body: bytes, chunk: int = 7, **limits: int) -> PartSpooler:
    sp = PartSpooler(b"B", tmp_path, max_part_bytes=limits.get("part", 1000), max_body_bytes=limits.get("body", 10000))
    for i in range(0, len(body), chunk):
        sp.write(body[i : i + chunk])
    return sp


def test_parts_are_written_to_files_as_they_stream(tmp_path: Path) -> None:
    body = (
        b"--B\r\nContent-Type: application/dicom\r\n\r\n" + b"x" * 300 + b"\r\n"
        b"--B\r\ncontent-type: text/plain\r\n\r\nhello\r\n--B--\r\nepilogue"
    )
    parts = _spool(tmp_path, body).finish()
    assert [p.path.read_bytes() for p in parts] == [b"x" * 300, b"hello"]
    assert [p.is_dicom for p in parts] == [True, False] and parts[0].received == 300

    big = _spool(tmp_path, b"--B\r\n\r\n" + b"y" * 2000 + b"\r\n--B--\r\n", part=1000).finish()
    assert big[0].received == 2000 and big[0].path.read_bytes() == b""  # emptied past the part cap


def test_bad_bodies_leave_nothing(tmp_path: Path) -> None:
    for body, error in (
        (b"no boundary here", MalformedBody),
        (b"--B\r\n\r\nabc", MalformedBody),
        (b"--B--\r\n", MalformedBody),
        (b"--B\r\n\r\n" + b"z" * 20000, BodyTooLarge),
    ):
        sp = PartSpooler(b"B", tmp_path, max_part_bytes=100000, max_body_bytes=10000)
        with pytest.raises(error):
            for i in range(0, len(body), 512):
                sp.write(body[i : i + 512])
            sp.finish()
        sp.discard()
        assert list(tmp_path.iterdir()) == [], body[:20]


def test_too_many_parts(tmp_path: Path) -> None:
    sp = PartSpooler(b"B", tmp_path, max_part_bytes=100, max_body_bytes=10000, max_parts=2)
    with pytest.raises(BodyTooLarge, match="more than 2 parts"):
        sp.write(b"--B\r\n\r\na\r\n--B\r\n\r\nb\r\n--B\r\n\r\nc\r\n--B--\r\n")
    sp.discard()
    assert list(tmp_path.iterdir()) == []


def test_response_status_json_and_xml() -> None:
    ok = InstanceResult("1.2.840.10008.5.1.4.1.1.1", "1.2.3.4")
    bad = InstanceResult("1.2.840.10008.5.1.4.1.1.1", "1.2.3.5", 0xA900, "why")
    warned = InstanceResult("1.2.840.10008.5.1.4.1.1.1", "1.2.3.6", None, "padding", warning_reason=0xB007)
    assert [http_status(r) for r in ([ok], [ok, bad], [bad], [ok, warned], [warned, bad])] == [200, 202, 409, 202, 202]
    (item,) = response_dataset([warned]).ReferencedSOPSequence
    assert item.WarningReason == 0xB007 and "FailureReason" not in item
    ds = response_dataset([ok, bad, InstanceResult("", "", 0xC000)])
    back = Dataset.from_json(to_json(ds).decode())
    assert back.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "1.2.3.4"
    assert [int(i.FailureReason) for i in back.FailedSOPSequence] == [0xA900, 0xC000]
    assert "ReferencedSOPInstanceUID" not in back.FailedSOPSequence[1]
    root = ElementTree.fromstring(to_xml(ds))
    failed = root.find("DicomAttribute[@keyword='FailedSOPSequence']")
    assert failed is not None and failed.get("vr") == "SQ" and failed.get("tag") == "00081198"
    reasons = [v.text for v in failed.iter("Value") if v.text and not v.text.startswith("1.2")]
    assert reasons == [str(0xA900), str(0xC000)]
    assert accepts_xml("application/dicom+xml") and not accepts_xml("application/dicom+json, application/dicom+xml")
    assert not accepts_xml("") and not accepts_xml("*/*")


def test_bearer_header() -> None:
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer ") is None and bearer_token("") is None


def test_stow_destination_settings() -> None:
    e = AEEntry(name="WEB", role="destination", url="https://pacs.example/dicom-web/", auth="bearer", secret="t")
    assert e.url == "https://pacs.example/dicom-web" and e.host is None
    for bad in (
        {"url": "ftp://x"},
        {"url": "https://x", "auth": "basic", "secret": "p"},
        {"url": "https://x", "auth": "bearer"},
        {"auth": "bearer", "secret": "t", "host": "h", "port": 1},
        {},
    ):
        with pytest.raises(ValueError):
            AEEntry(name="WEB", role="destination", **bad)  # type: ignore[arg-type]
