"""Webhook alerts: minimal-PHI payload, HMAC signature, and delivery to a real HTTP server process that
verifies the signature with its own implementation of the documented scheme."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.alerts.message import NOT_FOR_DIAGNOSTIC_USE, AlertError
from node.alerts.webhook import (
    ALERT_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    deliver,
    payload,
    sign,
    signed_headers,
    verify,
)
from node.runtime.config import WebhookDestination
from tests.support.http_receiver import HTTPReceiver, sample_alert

SECRET = "whsec_0123456789abcdef"
PATIENT_VALUES = ("PID-778899", "Doe^Jane^Q", "19610304", "1.2.826.0.1.3680043.8.498.77", "20261115")


# ------------------------------------------------------------------------------------ payload


def test_payload_is_compact_json_with_the_findings_and_no_patient_fields_by_default() -> None:
    alert = sample_alert()
    body = payload(alert, include_patient=False)
    data = json.loads(body)
    assert body == json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()  # compact UTF-8
    assert data["event"] == "cxrnode.triage.alert"
    assert data["alert_id"] == alert.alert_id and data["created_at"] == alert.created_at
    assert data["study_instance_uid"] == "1.2.826.0.1.3680043.8.498.10001"
    assert data["accession_number"] == "ACC-2026-0042"
    assert data["level"] == "critical" and data["reasons"] == alert.reasons and data["revision"] == 1
    assert data["findings"] == {
        "severity_score": 5,
        "severity_change": 2,
        "prior": {"study_instance_uid": "1.2.826.0.1.3680043.8.498.9000", "severity_score": 3},
        "pneumothorax": {"present": True, "side": "right", "probability": 0.9134},
    }
    assert data["models"][2] == {"name": "pneumothorax", "version": "0.9.0", "status": "experimental"}
    assert data["experimental"] is True and data["note"] == NOT_FOR_DIAGNOSTIC_USE
    assert "patient" not in data and "study_date" not in data
    text = body.decode()
    for value in PATIENT_VALUES:
        assert value not in text, f"{value} leaked into the minimal payload"


def test_payload_with_patient_fields_when_configured() -> None:
    data = json.loads(payload(sample_alert(), include_patient=True))
    assert data["patient"] == {
        "id": "PID-778899",
        "issuer": "1.2.826.0.1.3680043.8.498.77",
        "name": "Doe^Jane^Q",
        "birth_date": "19610304",
        "sex": "F",
    }
    assert data["findings"]["prior"]["study_date"] == "20261115"
    assert data["study_date"] == "20261202"


def test_payload_without_findings_keeps_nulls() -> None:
    alert = sample_alert(
        severity_score=None,
        severity_change=None,
        prior=None,
        pneumothorax_present=None,
        pneumothorax_probability=None,
        pneumothorax_side=None,
        models=[],
        experimental=False,
        note="",
        level="routine",
        reasons=["no analysable image"],
    )
    data = json.loads(payload(alert, include_patient=False))
    assert data["findings"] == {
        "severity_score": None,
        "severity_change": None,
        "prior": None,
        "pneumothorax": {"present": None, "side": None, "probability": None},
    }
    assert data["note"] == "" and data["experimental"] is False


def test_signed_headers_verify_and_tampering_fails() -> None:
    body = payload(sample_alert(), include_patient=False)
    headers = signed_headers(SECRET.encode(), body, "a-1", timestamp=1_800_000_000)
    assert headers[TIMESTAMP_HEADER] == "1800000000"
    assert headers[SIGNATURE_HEADER] == sign(SECRET.encode(), 1_800_000_000, body)
    assert headers[ALERT_ID_HEADER] == "a-1" and headers["Content-Type"] == "application/json"
    ok = (SECRET.encode(), headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER])
    assert verify(*ok, body, now=1_800_000_100)
    assert not verify(*ok, body.replace(b"critical", b"routine!"), now=1_800_000_100)
    assert not verify(*ok, body, now=1_800_000_000 + 301)  # replay of an old request


# ------------------------------------------------------------------------------------ delivery


@pytest.fixture
def hook(tmp_path: Path) -> Iterator[HTTPReceiver]:
    with HTTPReceiver(tmp_path / "hook", "webhook", secret=SECRET) as server:
        yield server


def _dest(server: HTTPReceiver, **kwargs: Any) -> WebhookDestination:
    values: dict[str, Any] = {"name": "pager", "type": "webhook", "url": server.url, "secret": SECRET, "timeout_s": 5.0}
    values.update(kwargs)
    return WebhookDestination(**values)


def test_deliver_is_signed_and_verified_by_the_receiver(hook: HTTPReceiver) -> None:
    alert = sample_alert()
    receipt = deliver(_dest(hook), alert)
    assert receipt.startswith("HTTP 200")
    (request,) = hook.requests()
    assert request["answer"] == 200 and request["problems"] == []  # the receiver's own check passed
    headers, body = request["headers"], request["body"].encode()
    assert headers[ALERT_ID_HEADER] == alert.alert_id
    assert abs(int(headers[TIMESTAMP_HEADER]) - time.time()) < 60
    assert verify(SECRET.encode(), headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER], body)
    assert not verify(SECRET.encode(), headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER], body + b" ")
    assert not verify(b"another secret", headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER], body)
    assert not verify(
        SECRET.encode(),
        headers[TIMESTAMP_HEADER],
        headers[SIGNATURE_HEADER],
        body,
        now=int(headers[TIMESTAMP_HEADER]) + 600,
    )
    data = json.loads(body)
    assert "patient" not in data
    assert not any(v in request["body"] for v in PATIENT_VALUES)


def test_include_patient_sends_patient_fields(hook: HTTPReceiver) -> None:
    deliver(_dest(hook, include_patient=True), sample_alert())
    (request,) = hook.requests()
    assert json.loads(request["body"])["patient"]["id"] == "PID-778899"


def test_retry_carries_the_same_idempotency_key(hook: HTTPReceiver) -> None:
    alert = sample_alert()
    deliver(_dest(hook), alert)
    deliver(_dest(hook), alert)
    one, two = hook.requests()
    assert one["headers"][ALERT_ID_HEADER] == two["headers"][ALERT_ID_HEADER] == alert.alert_id
    assert one["duplicate"] is False and two["duplicate"] is True
    assert one["body"] == two["body"]  # same content; only timestamp and signature differ


def test_secret_file_is_read_at_send_time(hook: HTTPReceiver, tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("not-the-secret\n")
    dest = _dest(hook, secret="", secret_file=secret_file)
    with pytest.raises(AlertError) as err:
        deliver(dest, sample_alert())
    assert not err.value.retryable and "401" in err.value.reason and "signature" in err.value.reason
    secret_file.write_text(SECRET + "\n")
    assert deliver(dest, sample_alert()).startswith("HTTP 200")
    secret_file.unlink()
    with pytest.raises(AlertError) as err:
        deliver(dest, sample_alert())
    assert not err.value.retryable and "secret_file" in err.value.reason


@pytest.mark.parametrize(
    "status,retryable", [(500, True), (502, True), (429, True), (401, False), (403, False), (422, False)]
)
def test_status_classification(hook: HTTPReceiver, status: int, retryable: bool) -> None:
    hook.behave(str(status))
    with pytest.raises(AlertError) as err:
        deliver(_dest(hook), sample_alert())
    assert err.value.retryable is retryable
    assert f"HTTP {status}" in err.value.reason and f"told to answer {status}" in err.value.reason


def test_down_then_up_delivers(hook: HTTPReceiver) -> None:
    dest = _dest(hook)
    hook.stop()
    started = time.monotonic()
    with pytest.raises(AlertError) as err:
        deliver(dest, sample_alert())
    assert err.value.retryable and time.monotonic() - started < 2.0
    hook.start()
    hook.behave("500")
    with pytest.raises(AlertError) as err:
        deliver(dest, sample_alert())
    assert err.value.retryable
    hook.behave("ok")
    assert deliver(dest, sample_alert()).startswith("HTTP 200")
    assert [r["answer"] for r in hook.requests()] == [500, 200]


def test_hang_times_out_retryable(hook: HTTPReceiver) -> None:
    hook.behave("hang")
    started = time.monotonic()
    with pytest.raises(AlertError) as err:
        deliver(_dest(hook, timeout_s=1.0), sample_alert())
    assert err.value.retryable and "timed out" in err.value.reason
    assert time.monotonic() - started < 4.0


# ------------------------------------------------------------------------------------ the documentation


def _docs_section() -> str:
    text = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    return text[text.index("### Webhook alerts") :]


def _code_block(section: str, lang: str) -> str:
    start = section.index(f"```{lang}\n") + len(lang) + 4
    return section[start : section.index("```", start)]


def test_documented_receiver_snippet_verifies_a_delivered_request(hook: HTTPReceiver) -> None:
    namespace: dict[str, Any] = {}
    exec(_code_block(_docs_section(), "python"), namespace)  # the snippet as printed in docs/operations.md
    documented_verify = namespace["verify"]
    deliver(_dest(hook), sample_alert())
    (request,) = hook.requests()
    ts, sig, body = request["headers"][TIMESTAMP_HEADER], request["headers"][SIGNATURE_HEADER], request["body"]
    assert documented_verify(SECRET.encode(), ts, sig, body.encode())
    assert not documented_verify(SECRET.encode(), ts, sig, body.encode() + b"x")
    assert not documented_verify(SECRET.encode(), str(int(ts) - 400), sig, body.encode())


def test_documented_example_payload_and_signature_match_the_code() -> None:
    section = _docs_section()
    documented = json.loads(_code_block(section, "json"))
    body = payload(sample_alert(), include_patient=False)
    assert documented == json.loads(body)
    timestamp = int(section.split("X-CXRNode-Timestamp: ")[1].split()[0])
    signature = section.split("X-CXRNode-Signature: ")[1].split()[0]
    assert signature == sign(SECRET.encode(), timestamp, body)
