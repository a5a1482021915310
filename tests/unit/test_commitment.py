"""node.export.commitment's data sets and retry policy, without a network: what goes into an N-ACTION and
comes out of an N-EVENT-REPORT, and when an uncommitted result is sent again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.sequence import Sequence as DicomSequence

from node.export.commitment import (
    EVENT_ALL_COMMITTED,
    EVENT_SOME_FAILED,
    NO_SUCH_OBJECT_INSTANCE,
    Reference,
    Report,
    failure_text,
    parse_request,
    request_dataset,
    retry_at,
)
from node.runtime.config import SenderConfig

CR = "1.2.840.10008.5.1.4.1.1.1"


def _roundtrip(ds: Dataset) -> Dataset:
    """Encode as a file and read back, as the peer would see it."""
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.20.1"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.840.10008.1.20.1.1"
    buf = DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return dcmread(DicomBytesIO(buf.getvalue()))


def test_request_and_report_survive_encoding() -> None:
    refs = [Reference(CR, "1.2.3.1"), Reference(CR, "1.2.3.2")]
    tx, parsed = parse_request(_roundtrip(request_dataset("1.2.9", refs)))
    assert (tx, parsed) == ("1.2.9", refs)

    report = Report("1.2.9", committed=[refs[0]], failed=[(refs[1], NO_SUCH_OBJECT_INSTANCE)])
    assert report.event_type == EVENT_SOME_FAILED
    back = Report.from_dataset(_roundtrip(report.to_dataset()))
    assert back == report
    assert Report("1.2.9", committed=refs).event_type == EVENT_ALL_COMMITTED
    assert "FailedSOPSequence" not in Report("1.2.9", committed=refs).to_dataset()


def _request(transaction_uid: str | None, items: list[dict[str, str]] | None) -> Dataset:
    ds = Dataset()
    if transaction_uid is not None:
        ds.TransactionUID = transaction_uid
    if items is not None:
        ds.ReferencedSOPSequence = DicomSequence([Dataset() for _ in items])
        for item, values in zip(ds.ReferencedSOPSequence, items, strict=True):
            for keyword, value in values.items():
                setattr(item, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("transaction_uid", "items", "reason"),
    [
        (None, [{"ReferencedSOPClassUID": CR, "ReferencedSOPInstanceUID": "1.2.3"}], "no Transaction UID"),
        ("1.2", None, "no Referenced SOP Sequence"),
        ("1.2", [], "no Referenced SOP Sequence"),
        ("1.2", [{"ReferencedSOPClassUID": CR}], "lacks its SOP Class or SOP Instance UID"),
    ],
)
def test_malformed_requests_say_what_is_missing(
    transaction_uid: str | None, items: list[dict[str, str]] | None, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_request(_request(transaction_uid, items))


def test_uncommitted_results_follow_the_exporters_backoff_then_die() -> None:
    cfg = SenderConfig(max_attempts=3, backoff_initial_s=10, backoff_factor=2, backoff_max_s=600)
    when = retry_at(cfg)
    now = datetime.now(UTC)
    first, second = when(1), when(2)
    assert first is not None and second is not None
    assert timedelta(seconds=9) < first - now < timedelta(seconds=11)  # backoff_delay(1)
    assert timedelta(seconds=19) < second - now < timedelta(seconds=21)  # backoff_delay(2)
    assert when(3) is None  # max_attempts sends made: dead


def test_failure_reasons_in_words() -> None:
    assert failure_text(0x0112) == "0x0112 no such object instance"
    assert failure_text(0xA7FF) == "0xA7FF failure"
    assert failure_text(None) == "failed (no Failure Reason)"
