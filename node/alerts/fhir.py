"""Triage alerts as FHIR R4: a transaction Bundle (Patient, Observations, DiagnosticReport) POSTed to a
FHIR server's base URL.

Why this shape:

* **One transaction, conditional creates.** Every resource carries an identifier derived from the
  alert id (the Patient: the hospital's patient id and issuer) and is POSTed with ``ifNoneExist`` on
  it. A retry after a lost response therefore creates nothing twice, and the Patient resolves to
  the one the EHR already holds when it has that identifier. References inside the bundle use
  ``urn:uuid`` fullUrls, which the server rewrites to the resources it created or found.
* **Validated before it leaves.** Each resource is built as a ``fhir.resources`` R4B model (R4B is
  the R4-compatible package of fhir.resources 8), so a malformed bundle fails here, in our tests,
  not at the hospital's server.
* **R4 constraints drive some choices.** ``Observation.value[x]`` has no decimal in R4, so the
  pneumothorax probability is a Quantity with UCUM unit ``1``. DICOM study dates have no time zone,
  and an R4 dateTime with a time must have one, so ``effectiveDateTime`` is the study date only.
* **Codes.** The report code is LOINC 18748-4 "Diagnostic imaging study": the node reports on the
  whole study, which may hold one frontal image or several views, so a view-count specific code such
  as 36643-5 "XR Chest 2 Views" would be wrong for most studies, and this is the generic imaging report
  code US Core uses. Category is v2-0074 RAD. Findings use SNOMED CT (pneumothorax 36118008, severity
  246112005, lung structures for the side); what SNOMED/LOINC have no code for (severity change,
  triage level, probability) uses the node's own code system :data:`CODE_SYSTEM`.
* **The study is referenced by identifier** (``urn:dicom:uid`` / ``urn:oid:<StudyInstanceUID>``): the
  node does not know the ImagingStudy's id on the server, and a logical reference needs none.
* **Status.** Revision 1 is ``final``; a later revision (a late image updated the study result) is
  ``amended``: new information, not the correction of an error, and it tells the reader that it
  supersedes the earlier report of the same study (same accession and study UID).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient

from node.alerts.message import AlertError, TriageAlert
from node.alerts.webhook import post
from node.runtime.config import FHIRDestination

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"

# Code systems
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
DICOM_UID_SYSTEM = "urn:dicom:uid"

# The node's own systems. URNs, not URLs: nothing is served at them, and a hospital's terminology
# server can map them like any other local code system.
CODE_SYSTEM = "urn:cxr-node:codes"  # codes SNOMED/LOINC have none for (triage level, severity change, ...)
ALERT_ID_SYSTEM = "urn:cxr-node:alert-id"  # DiagnosticReport.identifier
OBSERVATION_ID_SYSTEM = "urn:cxr-node:observation-id"  # "<alert id>.<finding>"
PATIENT_ISSUER_SYSTEM = "urn:cxr-node:patient-id-issuer:"  # + percent-encoded IssuerOfPatientID (not an OID)
PATIENT_LOCAL_SYSTEM = "urn:cxr-node:patient-id"  # patient id without an issuer

REPORT_CODE = {"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}

_OID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_DA_RE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_GENDER = {"M": "male", "F": "female", "O": "other"}
_SIDE_SITE = {  # SNOMED CT body structures
    "right": ("3341006", "Right lung structure"),
    "left": ("44029006", "Left lung structure"),
    "both": ("74101002", "Both lungs"),
}
_LEVEL_DISPLAY = {"critical": "Critical: read first", "urgent": "Urgent", "routine": "Routine"}


def _coding(system: str, code: str, display: str) -> dict[str, str]:
    return {"system": system, "code": code, "display": display}


_FULL_URL_NAMESPACE = uuid.UUID("5b0c7a52-3c1e-4f4e-9a51-2f0d3c8e6a11")  # fixed: same alert → same fullUrls


def _uuid_url(identifier: dict[str, str]) -> str:
    """A bundle-local ``urn:uuid`` derived from the resource's identifier, so a retry sends the same bytes."""
    return f"urn:uuid:{uuid.uuid5(_FULL_URL_NAMESPACE, identifier['system'] + '|' + identifier['value'])}"


def patient_identifier(alert: TriageAlert) -> dict[str, str]:
    """``Patient.identifier``: ``urn:oid:<issuer>`` when IssuerOfPatientID is an OID, else a node URN."""
    issuer = alert.issuer_of_patient_id.strip()
    if _OID_RE.match(issuer):
        system = f"urn:oid:{issuer}"
    elif issuer:
        system = PATIENT_ISSUER_SYSTEM + quote(issuer, safe="")
    else:
        system = PATIENT_LOCAL_SYSTEM
    return {"system": system, "value": alert.patient_id.strip()}


def _fhir_date(da: str) -> str | None:
    """DICOM DA (YYYYMMDD) → FHIR date (YYYY-MM-DD); None when empty or not a real date."""
    m = _DA_RE.match(da.strip())
    if not m:
        return None
    try:
        datetime(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None
    return f"{m[1]}-{m[2]}-{m[3]}"


def _fhir_instant(iso: str) -> str:
    """ISO 8601 → FHIR instant (always with a zone; a naive time is taken as UTC)."""
    try:
        when = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        log.warning("alert created_at %r is not ISO 8601; using now", iso)
        when = datetime.now(UTC)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.isoformat()


def _human_name(pn: str) -> dict[str, Any] | None:
    """DICOM PN (alphabetic group: family^given^middle^prefix^suffix) → HumanName."""
    alphabetic = pn.split("=")[0].strip()
    if not alphabetic:
        return None
    parts = [p.strip() for p in alphabetic.split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    name: dict[str, Any] = {
        "use": "official",
        "text": " ".join(p for p in (prefix, given, middle, family, suffix) if p),
    }
    if family:
        name["family"] = family
    givens = [g for g in (given, middle) if g]
    if givens:
        name["given"] = givens
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return name


def _study_reference(study_uid: str, display: str) -> dict[str, Any]:
    """A logical reference to the ImagingStudy with this Study Instance UID."""
    return {
        "type": "ImagingStudy",
        "display": display,
        "identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{study_uid}"},
    }


def _models_text(alert: TriageAlert) -> str:
    return ", ".join(f"{m.name} {m.version} ({m.status})" for m in alert.models)


def _status(alert: TriageAlert) -> str:
    return "final" if alert.revision <= 1 else "amended"


class _Builder:
    """Collects the bundle entries of one alert; every resource is validated as it is added."""

    def __init__(self, alert: TriageAlert) -> None:
        self.alert = alert
        self.entries: list[dict[str, Any]] = []
        self.status = _status(alert)
        self.issued = _fhir_instant(alert.created_at)
        self.effective = _fhir_date(alert.study_date)
        self.subject: dict[str, str] | None = None
        self.observation_urls: list[str] = []

    def add(
        self,
        model: type[Patient | Observation | DiagnosticReport],
        resource: dict[str, Any],
        identifier: dict[str, str],
    ) -> str:
        validated = model.model_validate(resource)
        url = _uuid_url(identifier)
        self.entries.append(
            {
                "fullUrl": url,
                "resource": validated.model_dump(mode="json", exclude_none=True),
                "request": {
                    "method": "POST",
                    "url": resource["resourceType"],
                    "ifNoneExist": f"identifier={quote(identifier['system'], safe=':/')}|"
                    f"{quote(identifier['value'], safe='')}",
                },
            }
        )
        return url

    # ------------------------------------------------------------------------------------ resources

    def patient(self) -> None:
        a = self.alert
        if not a.patient_id.strip():
            log.warning("alert %s has no patient id: the FHIR report goes without a subject", a.alert_id)
            return
        identifier = patient_identifier(a)
        resource: dict[str, Any] = {"resourceType": "Patient", "identifier": [identifier]}
        name = _human_name(a.patient_name)
        if name:
            resource["name"] = [name]
        birth = _fhir_date(a.patient_birth_date)
        if birth:
            resource["birthDate"] = birth
        gender = _GENDER.get(a.patient_sex.strip().upper())
        if gender:
            resource["gender"] = gender
        url = self.add(Patient, resource, identifier)
        self.subject = {"reference": url, "type": "Patient"}

    def observation(self, key: str, code: list[dict[str, str]], text: str, value: dict[str, Any], **extra: Any) -> None:
        a = self.alert
        identifier = {"system": OBSERVATION_ID_SYSTEM, "value": f"{a.alert_id}.{key}"}
        notes = ([{"text": a.note}] if a.note else []) + list(extra.pop("note", []))
        resource: dict[str, Any] = {
            "resourceType": "Observation",
            "identifier": [identifier],
            "status": self.status,
            "category": [{"coding": [_coding(OBSERVATION_CATEGORY, "imaging", "Imaging")]}],
            "code": {"coding": code, "text": text},
            "issued": self.issued,
            "derivedFrom": [_study_reference(a.study_instance_uid, "analysed study")],
            **value,
            **extra,
        }
        if self.subject:
            resource["subject"] = self.subject
        if self.effective:
            resource["effectiveDateTime"] = self.effective
        if a.models:
            resource["device"] = {"display": f"cxr-node AI models: {_models_text(a)}"}
        if notes:
            resource["note"] = notes
        self.observation_urls.append(self.add(Observation, resource, identifier))

    def findings(self) -> None:
        a = self.alert
        if a.severity_score is not None:
            self.observation(
                "severity",
                [
                    _coding(CODE_SYSTEM, "severity-score", "Lung opacity severity score (zones, 0-6)"),
                    _coding(SNOMED, "246112005", "Severity"),
                ],
                "Lung opacity severity score (0-6 lung zones with opacity)",
                {"valueInteger": int(a.severity_score)},
                referenceRange=[
                    {"low": {"value": 0}, "high": {"value": 6}, "text": "0 (no zone) to 6 (all six lung zones)"}
                ],
            )
        if a.severity_change is not None or a.prior is not None:
            value: dict[str, Any] = (
                {"valueInteger": int(a.severity_change)}
                if a.severity_change is not None
                else {
                    "dataAbsentReason": {
                        "coding": [_coding(DATA_ABSENT, "not-applicable", "Not Applicable")],
                        "text": "the prior study has no severity score",
                    }
                }
            )
            components: list[dict[str, Any]] = []
            derived = [_study_reference(a.study_instance_uid, "analysed study")]
            if a.prior is not None:
                derived.append(_study_reference(a.prior.study_instance_uid, "prior study"))
                if a.prior.severity_score is not None:
                    components.append(
                        {
                            "code": {
                                "coding": [
                                    _coding(CODE_SYSTEM, "prior-severity-score", "Severity score of the prior study")
                                ]
                            },
                            "valueInteger": int(a.prior.severity_score),
                        }
                    )
                prior_date = _fhir_date(a.prior.study_date)
                if prior_date:
                    components.append(
                        {
                            "code": {"coding": [_coding(CODE_SYSTEM, "prior-study-date", "Date of the prior study")]},
                            "valueDateTime": prior_date,
                        }
                    )
            extra: dict[str, Any] = {"derivedFrom": derived}
            if components:
                extra["component"] = components
            self.observation(
                "severity-change",
                [_coding(CODE_SYSTEM, "severity-change", "Change of severity score against the prior study")],
                "Severity score change against the prior study",
                value,
                **extra,
            )
        if a.pneumothorax_present is not None:
            present = bool(a.pneumothorax_present)
            extra = {}
            site = _SIDE_SITE.get((a.pneumothorax_side or "").strip().lower())
            if present and site:
                extra["bodySite"] = {"coding": [_coding(SNOMED, *site)], "text": a.pneumothorax_side}
            if a.pneumothorax_probability is not None:
                extra["component"] = [
                    {
                        "code": {
                            "coding": [_coding(CODE_SYSTEM, "probability", "Model probability")],
                            "text": "pneumothorax probability",
                        },
                        "valueQuantity": {
                            "value": round(float(a.pneumothorax_probability), 4),
                            "unit": "probability",
                            "system": UCUM,
                            "code": "1",
                        },
                    }
                ]
            self.observation(
                "pneumothorax",
                [_coding(SNOMED, "36118008", "Pneumothorax")],
                "Pneumothorax",
                {
                    "valueCodeableConcept": {
                        "coding": [
                            _coding(SNOMED, "52101004", "Present") if present else _coding(SNOMED, "2667000", "Absent")
                        ],
                        "text": "present" if present else "absent",
                    }
                },
                **extra,
            )
        self.observation(
            "triage-level",
            [_coding(CODE_SYSTEM, "triage-level", "Triage level")],
            "Triage level",
            {
                "valueCodeableConcept": {
                    "coding": [_coding(CODE_SYSTEM, a.level, _LEVEL_DISPLAY[a.level])],
                    "text": a.level,
                }
            },
            note=[{"text": r} for r in a.reasons],
        )

    def report(self) -> None:
        a = self.alert
        identifier = {"system": ALERT_ID_SYSTEM, "value": a.alert_id}
        lines = [f"Triage level: {a.level.upper()}."]
        if a.reasons:
            lines.append("Reasons: " + "; ".join(a.reasons) + ".")
        if a.revision > 1:
            lines.append(f"Revision {a.revision}: supersedes the earlier AI result for this study.")
        if a.models:
            lines.append(f"Models: {_models_text(a)}.")
        if a.note:
            lines.append(a.note)
        resource: dict[str, Any] = {
            "resourceType": "DiagnosticReport",
            "identifier": [identifier],
            "status": self.status,
            "category": [{"coding": [_coding(V2_0074, "RAD", "Radiology")]}],
            "code": {
                "coding": [REPORT_CODE, _coding(CODE_SYSTEM, "ai-triage", "AI chest X-ray triage")],
                "text": "AI chest X-ray triage",
            },
            "issued": self.issued,
            "imagingStudy": [_study_reference(a.study_instance_uid, f"study {a.accession_number}".strip())],
            "result": [{"reference": url, "type": "Observation"} for url in self.observation_urls],
            "conclusion": " ".join(lines),
            "conclusionCode": [{"coding": [_coding(CODE_SYSTEM, a.level, _LEVEL_DISPLAY[a.level])]}],
        }
        if a.accession_number:
            # The accession is how a RIS matches the report to its order; as a second identifier the
            # conditional create still keys on the alert id only (first identifier, used in ifNoneExist).
            resource["identifier"].append(
                {
                    "type": {
                        "coding": [_coding("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN", "Accession ID")]
                    },
                    "value": a.accession_number,
                }
            )
        if self.subject:
            resource["subject"] = self.subject
        if self.effective:
            resource["effectiveDateTime"] = self.effective
        self.add(DiagnosticReport, resource, identifier)


def build_bundle(alert: TriageAlert) -> dict[str, Any]:
    """The transaction Bundle for ``alert`` as a JSON-ready dict, validated as an R4B Bundle.

    Entries: Patient (when the alert has a patient id), one Observation per measured finding plus the
    triage level, then the DiagnosticReport, each a conditional create (``ifNoneExist``).
    """
    builder = _Builder(alert)
    builder.patient()
    builder.findings()
    builder.report()
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": builder.entries}
    return Bundle.model_validate(bundle).model_dump(mode="json", exclude_none=True)


def _token(dest: FHIRDestination) -> str:
    """The bearer token: ``token_file`` read at send time (rotation needs no restart), else ``token``."""
    if dest.token_file is not None:
        try:
            return Path(dest.token_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise AlertError(
                f"FHIR {dest.name}: cannot read token_file {dest.token_file}: {e.strerror or e}", retryable=False
            ) from e
    return dest.token.strip()


def operation_outcome_diagnostics(response: httpx.Response) -> str:
    """The issues of an OperationOutcome body (severity, code, diagnostics/details), else a body excerpt."""
    text = response.text
    try:
        data = json.loads(text)
    except ValueError:
        return " ".join(text.split())[:500]
    if isinstance(data, dict) and data.get("resourceType") == "OperationOutcome":
        parts = []
        for issue in data.get("issue") or []:
            if not isinstance(issue, dict):
                continue
            detail = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or ""
            parts.append(f"{issue.get('severity', '?')}/{issue.get('code', '?')}: {detail}".rstrip(": "))
        if parts:
            return "; ".join(parts)[:500]
    return " ".join(text.split())[:500]


def _receipt(response: httpx.Response, bundle: dict[str, Any]) -> str:
    """``"HTTP <status> <location>"``: the Location header, or the report's (else first) entry location."""
    location = response.headers.get("Location", "")
    if not location:
        try:
            entries = response.json().get("entry") or []
        except (ValueError, AttributeError):
            entries = []
        report_index = len(bundle["entry"]) - 1  # the DiagnosticReport is the last request entry
        ordered = ([entries[report_index]] if len(entries) > report_index else []) + entries[:1]
        for entry in ordered:
            loc = (entry.get("response") or {}).get("location") if isinstance(entry, dict) else None
            if loc:
                location = loc
                break
    return f"HTTP {response.status_code}" + (f" {location}" if location else "")


def deliver(dest: FHIRDestination, alert: TriageAlert) -> str:
    """POST the alert's transaction Bundle to ``dest.base_url``; return the receipt or raise AlertError."""
    bundle = build_bundle(alert)
    body = json.dumps(bundle, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    headers = {"Content-Type": f"{FHIR_JSON}; charset=utf-8", "Accept": FHIR_JSON}
    token = _token(dest)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    what = f"FHIR {dest.name}"
    response = post(
        dest.base_url.rstrip("/") or dest.base_url,
        body,
        headers,
        timeout_s=dest.timeout_s,
        ca_file=dest.ca_file,
        what=what,
        diagnostics=operation_outcome_diagnostics,
    )
    receipt = _receipt(response, bundle)
    log.info("%s accepted alert %s (%s)", what, alert.alert_id, receipt)
    return receipt
