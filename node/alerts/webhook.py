"""Triage alerts as a signed JSON webhook, and the one HTTP POST both HTTP destinations share.

Why this shape:

* **Minimal PHI by default.** A webhook usually lands in a chat bridge, a paging service or a
  worklist tool outside the RIS, so the body says what a reader needs to act (study UID, accession,
  level, findings) and nothing that identifies the patient unless the destination is configured
  with ``include_patient = true``.
* **Signed, with a timestamp.** ``X-CXRNode-Signature: sha256=<hex HMAC-SHA256(secret,
  "<timestamp>." + body)>`` over the exact bytes sent, with ``X-CXRNode-Timestamp`` (unix seconds)
  inside the signed text, so a receiver can reject forged bodies and replays of old ones. The same
  :func:`sign` / :func:`verify` are what our tests and docs/operations.md use, so the documented
  scheme and the sent one cannot drift apart.
* **Idempotency key.** ``X-CXRNode-Alert-Id`` is the alert id, stable across retries: a receiver
  that saw it already can answer 2xx and do nothing.
* **One status classification** for FHIR and webhooks (:func:`post`): 2xx delivered; 400/401/403/404/
  422 (and other 4xx) are configuration or content problems a retry cannot fix, so the alert goes to
  the dead letter at once; 408/409/429/5xx, refused connections and timeouts are retried with
  backoff by the caller.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from node.alerts.message import AlertError, TriageAlert
from node.runtime.config import WebhookDestination

log = logging.getLogger(__name__)

EVENT_TYPE = "cxrnode.triage.alert"
TIMESTAMP_HEADER = "X-CXRNode-Timestamp"
SIGNATURE_HEADER = "X-CXRNode-Signature"
ALERT_ID_HEADER = "X-CXRNode-Alert-Id"
SIGNATURE_PREFIX = "sha256="
USER_AGENT = "cxr-node"

# Statuses a retry cannot fix; any other 4xx is treated the same (except the retryable ones below).
NON_RETRYABLE = frozenset({400, 401, 403, 404, 422})
RETRYABLE_4XX = frozenset({408, 409, 425, 429})
_DIAGNOSTICS_MAX = 500


# ---------------------------------------------------------------------------------------------- payload


def payload(alert: TriageAlert, *, include_patient: bool) -> bytes:
    """The webhook body: compact UTF-8 JSON; patient fields only when ``include_patient``.

    Without patient fields the body also leaves out dates (the prior study's date), which HIPAA
    counts as identifiers; they come with ``include_patient``.
    """
    prior: dict[str, Any] | None = None
    if alert.prior is not None:
        prior = {"study_instance_uid": alert.prior.study_instance_uid, "severity_score": alert.prior.severity_score}
        if include_patient:
            prior["study_date"] = alert.prior.study_date
    body: dict[str, Any] = {
        "event": EVENT_TYPE,
        "alert_id": alert.alert_id,
        "created_at": alert.created_at,
        "study_instance_uid": alert.study_instance_uid,
        "accession_number": alert.accession_number,
        "level": alert.level,
        "reasons": list(alert.reasons),
        "revision": alert.revision,
        "findings": {
            "severity_score": alert.severity_score,
            "severity_change": alert.severity_change,
            "prior": prior,
            "pneumothorax": {
                "present": alert.pneumothorax_present,
                "side": alert.pneumothorax_side,
                "probability": alert.pneumothorax_probability,
            },
        },
        "models": [{"name": m.name, "version": m.version, "status": m.status} for m in alert.models],
        "experimental": alert.experimental,
        "note": alert.note,
    }
    if include_patient:
        body["patient"] = {
            "id": alert.patient_id,
            "issuer": alert.issuer_of_patient_id,
            "name": alert.patient_name,
            "birth_date": alert.patient_birth_date,
            "sex": alert.patient_sex,
        }
        body["study_date"] = alert.study_date
        body["study_time"] = alert.study_time
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------------------------------------- signing


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """``sha256=<hex HMAC-SHA256(secret, b"<timestamp>." + body)>``, the X-CXRNode-Signature value."""
    mac = hmac.new(secret, f"{int(timestamp)}.".encode("ascii") + body, hashlib.sha256)
    return SIGNATURE_PREFIX + mac.hexdigest()


def verify(
    secret: bytes,
    timestamp_header: str,
    signature_header: str,
    body: bytes,
    *,
    tolerance_s: int = 300,
    now: float | None = None,
) -> bool:
    """True when the signature matches ``body`` and the timestamp is within ``tolerance_s`` of ``now``.

    Compares in constant time; a malformed header, a stale (or far-future) timestamp or any other
    signature gives False, never an exception.
    """
    try:
        timestamp = int(timestamp_header.strip())
    except (AttributeError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    if not isinstance(signature_header, str):
        return False
    expected = sign(secret, timestamp, body)
    return hmac.compare_digest(expected.encode("ascii"), signature_header.strip().encode("ascii", "replace"))


def signed_headers(secret: bytes, body: bytes, alert_id: str, *, timestamp: int | None = None) -> dict[str, str]:
    """The headers of one webhook request (content type, timestamp, signature, idempotency key)."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    return {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: str(ts),
        SIGNATURE_HEADER: sign(secret, ts, body),
        ALERT_ID_HEADER: alert_id,
    }


def _secret(dest: WebhookDestination) -> bytes:
    """The HMAC key: ``secret_file`` (read now, so a rotated file takes effect at once) or ``secret``."""
    if dest.secret_file is not None:
        try:
            value = Path(dest.secret_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise AlertError(
                f"webhook {dest.name}: cannot read secret_file {dest.secret_file}: {e.strerror or e}", retryable=False
            ) from e
        if not value:
            raise AlertError(f"webhook {dest.name}: secret_file {dest.secret_file} is empty", retryable=False)
        return value.encode("utf-8")
    if not dest.secret:
        raise AlertError(f"webhook {dest.name}: no secret configured", retryable=False)
    return dest.secret.encode("utf-8")


# ---------------------------------------------------------------------------------------------- HTTP


def _text_diagnostics(response: httpx.Response) -> str:
    """A short, single-line excerpt of an error response body (JSON ``error``/``message`` when given)."""
    text = response.text.strip()
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("error", "message", "detail"):
            if isinstance(data.get(key), str):
                text = data[key]
                break
    return " ".join(text.split())[:_DIAGNOSTICS_MAX]


def _verify_arg(ca_file: Path | None) -> ssl.SSLContext | bool:
    if ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as e:
        raise AlertError(f"cannot load ca_file {ca_file}: {e}", retryable=False) from e


def post(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout_s: float,
    ca_file: Path | None,
    what: str,
    diagnostics: Callable[[httpx.Response], str] = _text_diagnostics,
) -> httpx.Response:
    """POST ``body``; return the 2xx response or raise :class:`AlertError` classified for retry.

    ``what`` names the destination in messages (e.g. "webhook hook1"); ``diagnostics`` extracts a
    reason from an error response (FHIR passes an OperationOutcome reader).
    """
    all_headers = {"User-Agent": USER_AGENT, **headers}
    try:
        with httpx.Client(
            timeout=httpx.Timeout(timeout_s), verify=_verify_arg(ca_file), follow_redirects=False, trust_env=False
        ) as client:
            response = client.post(url, content=body, headers=all_headers)
    except httpx.TimeoutException as e:
        raise AlertError(
            f"{what}: timed out after {timeout_s:g} s ({type(e).__name__}) posting to {url}", retryable=True
        ) from e
    except httpx.UnsupportedProtocol as e:
        raise AlertError(f"{what}: unsupported URL scheme in {url!r} (use http or https)", retryable=False) from e
    except httpx.TransportError as e:
        raise AlertError(f"{what}: cannot reach {url}: {type(e).__name__}: {e}", retryable=True) from e
    except httpx.InvalidURL as e:
        raise AlertError(f"{what}: invalid URL {url!r}: {e}", retryable=False) from e
    status = response.status_code
    if 200 <= status < 300:
        return response
    detail = diagnostics(response)
    reason = f"{what}: HTTP {status} {response.reason_phrase}".rstrip() + (f": {detail}" if detail else "")
    retryable = status >= 500 or status in RETRYABLE_4XX
    if status in NON_RETRYABLE:
        retryable = False
    log.warning("%s answered HTTP %d (%s)", what, status, "will retry" if retryable else "not retryable")
    raise AlertError(reason, retryable=retryable)


def deliver(dest: WebhookDestination, alert: TriageAlert) -> str:
    """POST the signed payload to ``dest.url``; the receipt is ``"HTTP <status>"`` plus a short body excerpt."""
    body = payload(alert, include_patient=dest.include_patient)
    headers = signed_headers(_secret(dest), body, alert.alert_id)
    what = f"webhook {dest.name}"
    response = post(dest.url, body, headers, timeout_s=dest.timeout_s, ca_file=dest.ca_file, what=what)
    excerpt = " ".join(response.text.split())[:200]
    log.info("%s accepted alert %s (HTTP %d)", what, alert.alert_id, response.status_code)
    return f"HTTP {response.status_code}" + (f": {excerpt}" if excerpt else "")
