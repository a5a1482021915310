"""FHIR R4 alerts: the transaction Bundle's content, and delivery to a real HTTP server process that
checks the token, the content type and the Bundle (fhir.resources R4B) and emulates conditional create."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from node.alerts.fhir import (
    ALERT_ID_SYSTEM,
    CODE_SYSTEM,
    PATIENT_ISSUER_SYSTEM,
    PATIENT_LOCAL_SYSTEM,
    build_bundle,
    deliver,
)
from node.alerts.message import NOT_FOR_DIAGNOSTIC_USE, AlertError, TriageAlert
from node.runtime.config import FHIRDestination
from tests.support.http_receiver import HTTPReceiver, sample_alert
from tests.support.tls import self_signed

TOKEN = "s3cr3t-bearer"


def _by_type(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def _observation(bundle: dict[str, Any], code: str) -> dict[str, Any]:
    found = [
        e for e in _by_type(bundle, "Observation") if any(c["code"] == code for c in e["resource"]["code"]["coding"])
    ]
    assert len(found) == 1, f"{len(found)} observations with code {code}"
    return found[0]["resource"]


def _report(bundle: dict[str, Any]) -> dict[str, Any]:
    (entry,) = _by_type(bundle, "DiagnosticReport")
    return entry


# ------------------------------------------------------------------------------------ content


def test_bundle_validates_and_holds_the_alert_values() -> None:
    alert = sample_alert()
    bundle = build_bundle(alert)
    Bundle.model_validate(bundle)  # a valid R4B Bundle as JSON, not only as built
    json.dumps(bundle)
    assert bundle["type"] == "transaction"
    full_urls = [e["fullUrl"] for e in bundle["entry"]]
    assert all(u.startswith("urn:uuid:") for u in full_urls) and len(set(full_urls)) == len(full_urls)

    (patient_entry,) = _by_type(bundle, "Patient")
    patient = patient_entry["resource"]
    assert patient["identifier"] == [{"system": "urn:oid:1.2.826.0.1.3680043.8.498.77", "value": "PID-778899"}]
    assert patient["name"][0]["family"] == "Doe" and patient["name"][0]["given"] == ["Jane", "Q"]
    assert patient["birthDate"] == "1961-03-04"
    assert patient["gender"] == "female"

    severity = _observation(bundle, "severity-score")
    assert severity["valueInteger"] == 5
    assert severity["subject"]["reference"] == patient_entry["fullUrl"]
    assert severity["effectiveDateTime"] == "2026-12-02"
    assert severity["issued"].startswith("2026-12-02T23:40:05")
    assert {"text": NOT_FOR_DIAGNOSTIC_USE} in severity["note"]
    assert "pneumothorax 0.9.0 (experimental)" in severity["device"]["display"]

    change = _observation(bundle, "severity-change")
    assert change["valueInteger"] == 2
    prior_refs = [d["identifier"]["value"] for d in change["derivedFrom"]]
    assert "urn:oid:1.2.826.0.1.3680043.8.498.9000" in prior_refs
    components = {c["code"]["coding"][0]["code"]: c for c in change["component"]}
    assert components["prior-severity-score"]["valueInteger"] == 3
    assert components["prior-study-date"]["valueDateTime"] == "2026-11-15"

    ptx = _observation(bundle, "36118008")
    assert ptx["code"]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "36118008",
        "display": "Pneumothorax",
    }
    assert ptx["valueCodeableConcept"]["coding"][0]["code"] == "52101004"  # Present
    assert ptx["bodySite"]["coding"][0]["code"] == "3341006"  # right lung structure
    probability = ptx["component"][0]["valueQuantity"]
    assert probability["value"] == pytest.approx(0.9134)
    assert probability["system"] == "http://unitsofmeasure.org" and probability["code"] == "1"

    level = _observation(bundle, "triage-level")
    assert level["valueCodeableConcept"]["coding"][0] == {
        "system": CODE_SYSTEM,
        "code": "critical",
        "display": "Critical: read first",
    }
    assert [n["text"] for n in level["note"]][1:] == alert.reasons

    report_entry = _report(bundle)
    report = report_entry["resource"]
    assert bundle["entry"][-1] is report_entry  # last, after what it references
    assert report["status"] == "final"
    assert report["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "18748-4",
        "display": "Diagnostic imaging study",
    }
    assert report["category"][0]["coding"][0]["code"] == "RAD"
    assert report["identifier"][0] == {"system": ALERT_ID_SYSTEM, "value": alert.alert_id}
    assert report["identifier"][1]["value"] == "ACC-2026-0042"
    assert report["imagingStudy"] == [
        {
            "type": "ImagingStudy",
            "display": "study ACC-2026-0042",
            "identifier": {"system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.3680043.8.498.10001"},
        }
    ]
    observation_urls = [e["fullUrl"] for e in _by_type(bundle, "Observation")]
    assert [r["reference"] for r in report["result"]] == observation_urls
    assert len(observation_urls) == 4
    assert report["subject"]["reference"] == patient_entry["fullUrl"]
    assert "CRITICAL" in report["conclusion"] and NOT_FOR_DIAGNOSTIC_USE in report["conclusion"]
    assert all(r in report["conclusion"] for r in alert.reasons)
    assert report["conclusionCode"][0]["coding"][0]["code"] == "critical"


def test_every_entry_is_a_conditional_create_on_its_identifier() -> None:
    alert = sample_alert()
    bundle = build_bundle(alert)
    for entry in bundle["entry"]:
        request = entry["request"]
        assert request["method"] == "POST" and request["url"] == entry["resource"]["resourceType"]
        assert request["ifNoneExist"].startswith("identifier=")
    assert _report(bundle)["request"]["ifNoneExist"] == f"identifier={ALERT_ID_SYSTEM}|{alert.alert_id}"
    (patient,) = _by_type(bundle, "Patient")
    assert patient["request"]["ifNoneExist"] == "identifier=urn:oid:1.2.826.0.1.3680043.8.498.77|PID-778899"
    # Same alert again → the same bundle, fullUrls included (a retry sends the same bytes).
    assert build_bundle(alert) == bundle
    other = build_bundle(sample_alert(alert_id="another"))
    assert {e["fullUrl"] for e in other["entry"][1:]}.isdisjoint(e["fullUrl"] for e in bundle["entry"])


@pytest.mark.parametrize("revision,status", [(1, "final"), (2, "amended"), (5, "amended")])
def test_revision_sets_the_report_status(revision: int, status: str) -> None:
    bundle = build_bundle(sample_alert(revision=revision))
    report = _report(bundle)["resource"]
    assert report["status"] == status
    assert {e["resource"]["status"] for e in _by_type(bundle, "Observation")} == {status}
    assert ("supersedes" in report["conclusion"]) == (revision > 1)


def test_minimal_alert_without_findings_or_patient() -> None:
    alert = TriageAlert(
        alert_id="a-min",
        created_at="2026-12-02T10:00:00",
        level="routine",
        reasons=["no analysable image"],
        study_instance_uid="1.2.3.4",
        accession_number="",
        revision=1,
    )
    bundle = build_bundle(alert)
    Bundle.model_validate(bundle)
    assert not _by_type(bundle, "Patient")
    (obs,) = _by_type(bundle, "Observation")  # the triage level only
    assert obs["resource"]["valueCodeableConcept"]["coding"][0]["code"] == "routine"
    report = _report(bundle)["resource"]
    assert "subject" not in report and "effectiveDateTime" not in report
    assert report["issued"] == "2026-12-02T10:00:00Z"  # naive time taken as UTC
    assert "Not for diagnostic use" not in report["conclusion"]


def test_absent_pneumothorax_and_patient_id_systems() -> None:
    bundle = build_bundle(
        sample_alert(
            pneumothorax_present=False,
            pneumothorax_side=None,
            issuer_of_patient_id="HOSPITAL A|B",
            patient_sex="X",
            patient_birth_date="19610399",
            prior=None,
            severity_change=None,
        )
    )
    ptx = _observation(bundle, "36118008")
    assert ptx["valueCodeableConcept"]["coding"][0]["code"] == "2667000"  # Absent
    assert "bodySite" not in ptx
    assert not [
        e for e in _by_type(bundle, "Observation") if e["resource"]["code"]["coding"][0]["code"] == "severity-change"
    ]
    (patient,) = _by_type(bundle, "Patient")
    assert patient["resource"]["identifier"][0]["system"] == PATIENT_ISSUER_SYSTEM + "HOSPITAL%20A%7CB"
    assert "gender" not in patient["resource"] and "birthDate" not in patient["resource"]
    no_issuer = build_bundle(sample_alert(issuer_of_patient_id=""))
    assert _by_type(no_issuer, "Patient")[0]["resource"]["identifier"][0]["system"] == PATIENT_LOCAL_SYSTEM


# ------------------------------------------------------------------------------------ delivery


@pytest.fixture
def fhir_server(tmp_path: Path) -> Iterator[HTTPReceiver]:
    with HTTPReceiver(tmp_path / "fhir", "fhir", token=TOKEN) as server:
        yield server


def _dest(server: HTTPReceiver, **kwargs: Any) -> FHIRDestination:
    values: dict[str, Any] = {"name": "ehr", "type": "fhir", "base_url": server.url, "token": TOKEN, "timeout_s": 5.0}
    values.update(kwargs)
    return FHIRDestination(**values)


def test_deliver_posts_a_bundle_the_server_accepts(fhir_server: HTTPReceiver) -> None:
    alert = sample_alert()
    receipt = deliver(_dest(fhir_server), alert)
    (request,) = fhir_server.requests()
    assert request["answer"] == 201 and request["problems"] == []
    assert receipt.startswith("HTTP 201 DiagnosticReport/")
    assert request["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert request["headers"]["Content-Type"].startswith("application/fhir+json")
    sent = json.loads(request["body"])
    report = _report(sent)["resource"]
    assert report["identifier"][0]["value"] == alert.alert_id
    assert _observation(sent, "severity-score")["valueInteger"] == 5


def test_retried_post_creates_nothing_twice(fhir_server: HTTPReceiver) -> None:
    alert = sample_alert()
    first = deliver(_dest(fhir_server), alert)
    second = deliver(_dest(fhir_server), alert)
    one, two = fhir_server.requests()
    assert one["created"] is True and two["created"] is False
    assert {e["response"]["status"] for e in two["response"]["entry"]} == {"200 OK"}
    assert first.split()[-1] == second.split()[-1]  # the same DiagnosticReport
    # A later revision is a new alert: a new report, the Patient found again.
    deliver(_dest(fhir_server), sample_alert(alert_id="rev-2", revision=2))
    statuses = [e["response"]["status"] for e in fhir_server.requests()[2]["response"]["entry"]]
    assert statuses[0] == "200 OK" and statuses[-1] == "201 Created"


def test_token_file_is_read_at_send_time(fhir_server: HTTPReceiver, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("old-token\n")
    dest = _dest(fhir_server, token="", token_file=token_file)
    with pytest.raises(AlertError):
        deliver(dest, sample_alert())
    token_file.write_text(TOKEN + "\n")  # rotated: no restart, no new destination object
    assert deliver(dest, sample_alert()).startswith("HTTP 201")
    missing = _dest(fhir_server, token="", token_file=tmp_path / "nope")
    with pytest.raises(AlertError) as err:
        deliver(missing, sample_alert())
    assert not err.value.retryable and "token_file" in err.value.reason


@pytest.mark.parametrize("token", ["", "wrong-token"])
def test_missing_or_wrong_token_is_not_retryable(fhir_server: HTTPReceiver, token: str) -> None:
    with pytest.raises(AlertError) as err:
        deliver(_dest(fhir_server, token=token), sample_alert())
    assert err.value.retryable is False
    assert "401" in err.value.reason
    assert ("missing bearer token" if not token else "invalid bearer token") in err.value.reason


@pytest.mark.parametrize(
    "status,retryable",
    [(500, True), (503, True), (429, True), (408, True), (400, False), (403, False), (404, False), (422, False)],
)
def test_status_classification(fhir_server: HTTPReceiver, status: int, retryable: bool) -> None:
    fhir_server.behave(str(status))
    with pytest.raises(AlertError) as err:
        deliver(_dest(fhir_server), sample_alert())
    assert err.value.retryable is retryable
    assert f"HTTP {status}" in err.value.reason
    assert f"test receiver told to answer {status}" in err.value.reason  # OperationOutcome diagnostics


def test_wrong_path_or_scheme_is_not_retryable(fhir_server: HTTPReceiver) -> None:
    with pytest.raises(AlertError) as err:
        deliver(_dest(fhir_server, base_url=fhir_server.url.replace("/fhir", "/other")), sample_alert())
    assert not err.value.retryable and "404" in err.value.reason
    with pytest.raises(AlertError) as err:
        deliver(_dest(fhir_server, base_url=fhir_server.url.replace("http:", "ftp:")), sample_alert())
    assert not err.value.retryable and "scheme" in err.value.reason


def test_server_down_is_retryable_quickly_then_delivered_once(fhir_server: HTTPReceiver) -> None:
    dest = _dest(fhir_server)
    fhir_server.stop()
    started = time.monotonic()
    with pytest.raises(AlertError) as err:
        deliver(dest, sample_alert())
    assert err.value.retryable and time.monotonic() - started < 2.0
    assert "cannot reach" in err.value.reason
    fhir_server.start()  # same port
    assert deliver(dest, sample_alert()).startswith("HTTP 201")
    assert len(fhir_server.requests()) == 1


def test_hanging_server_times_out_retryable(fhir_server: HTTPReceiver) -> None:
    fhir_server.behave("hang")
    started = time.monotonic()
    with pytest.raises(AlertError) as err:
        deliver(_dest(fhir_server, timeout_s=1.0), sample_alert())
    elapsed = time.monotonic() - started
    assert err.value.retryable and "timed out" in err.value.reason
    assert 0.9 <= elapsed < 4.0
    fhir_server.behave("ok")
    assert deliver(_dest(fhir_server), sample_alert()).startswith("HTTP 201")


def test_dropped_connection_is_retryable(fhir_server: HTTPReceiver) -> None:
    fhir_server.behave("drop")
    with pytest.raises(AlertError) as err:
        deliver(_dest(fhir_server), sample_alert())
    assert err.value.retryable


def test_https_with_private_ca(tmp_path: Path) -> None:
    key, cert = self_signed(tmp_path, "fhir", common_name="127.0.0.1")
    with HTTPReceiver(tmp_path / "tls", "fhir", token=TOKEN, cert=cert, key=key) as server:
        assert server.url.startswith("https://")
        assert deliver(_dest(server, ca_file=cert), sample_alert()).startswith("HTTP 201")
        with pytest.raises(AlertError) as err:  # not trusted without the CA: retried (could be a cert rollout)
            deliver(_dest(server), sample_alert())
        assert err.value.retryable and "CERTIFICATE_VERIFY_FAILED" in err.value.reason
        assert len(server.requests()) == 1
