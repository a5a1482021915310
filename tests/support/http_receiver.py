"""A real HTTP receiver for alert tests: a FHIR server stand-in or a webhook endpoint, in its own process.

Run as ``python -m tests.support.http_receiver --port P --out DIR --mode fhir|webhook [--token T]
[--secret S] [--cert C --key K]``; tests use :class:`HTTPReceiver`, which starts it on a free
127.0.0.1 port, waits until it listens, and stops it.

It checks what it receives the way a strict peer would:

* ``fhir`` (POST ``/fhir``): bearer token, ``application/fhir+json``, the body parses and validates
  as an R4B transaction Bundle (fhir.resources), every entry is a POST with a ``urn:uuid`` fullUrl
  and every ``urn:uuid`` reference resolves inside the bundle. It emulates conditional create
  (``ifNoneExist`` on ``identifier=system|value``) with a store that survives restarts (``store.json``),
  and answers 201 (200 when every entry already existed) with a transaction-response Bundle and a
  ``Location`` header for the DiagnosticReport. Failures answer an OperationOutcome (401/415/400).
* ``webhook`` (POST ``/hook``): verifies ``X-CXRNode-Signature`` with its own implementation of the
  documented scheme (not node.alerts.webhook, so the documentation is what is tested), rejects
  stale timestamps, and answers 200 (401 with a JSON error when the signature fails).

Each request is written to ``DIR/requests/NNNN.json`` (method, path, headers, body, answer,
problems). ``DIR/control`` is re-read per request: ``ok`` (or no file), an HTTP status such as
``500``/``401``/``503``, ``hang`` (read the request, never answer) or ``drop`` (close without answering).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import itertools
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from node.alerts.message import NOT_FOR_DIAGNOSTIC_USE, AlertModel, Prior, TriageAlert
from tests.support.net import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
FHIR_PATH = "/fhir"
WEBHOOK_PATH = "/hook"
SIGNATURE_TOLERANCE_S = 300


# ------------------------------------------------------------------------------------ checks (server side)


def independent_verify(
    secret: bytes, timestamp: str, signature: str, body: bytes, *, tolerance_s: int = SIGNATURE_TOLERANCE_S
) -> str | None:
    """The docs/operations.md receiver recipe; None when valid, else what is wrong."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return f"timestamp header {timestamp!r} is not an integer"
    if abs(time.time() - ts) > tolerance_s:
        return f"timestamp {ts} is more than {tolerance_s} s from now"
    expected = "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature or ""):
        return "signature does not match"
    return None


def check_fhir_bundle(data: Any) -> list[str]:
    """What is wrong with a transaction Bundle (empty list: nothing)."""
    from fhir.resources.R4B.bundle import Bundle
    from pydantic import ValidationError

    problems: list[str] = []
    try:
        Bundle.model_validate(data)
    except ValidationError as e:
        return [f"not a valid R4B Bundle: {e}"]
    if data.get("type") != "transaction":
        problems.append(f"Bundle.type is {data.get('type')!r}, not 'transaction'")
    entries = data.get("entry") or []
    if not entries:
        problems.append("Bundle has no entries")
    full_urls = {e.get("fullUrl") for e in entries}
    for i, entry in enumerate(entries):
        resource = entry.get("resource") or {}
        request = entry.get("request") or {}
        if not str(entry.get("fullUrl", "")).startswith("urn:uuid:"):
            problems.append(f"entry {i}: fullUrl {entry.get('fullUrl')!r} is not urn:uuid")
        if request.get("method") != "POST" or request.get("url") != resource.get("resourceType"):
            problems.append(f"entry {i}: request {request} is not POST {resource.get('resourceType')}")
        for ref in _references(resource):
            if ref.startswith("urn:uuid:") and ref not in full_urls:
                problems.append(f"entry {i}: reference {ref} does not resolve inside the bundle")
    return problems


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


def _outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }


# ------------------------------------------------------------------------------------ the server


class _State:
    def __init__(self, out: Path, mode: str, token: str, secret: str) -> None:
        self.out = out
        self.mode = mode
        self.token = token
        self.secret = secret.encode()
        self.lock = threading.Lock()
        self.requests_dir = out / "requests"
        self.requests_dir.mkdir(parents=True, exist_ok=True)
        start = len(list(self.requests_dir.glob("*.json")))
        self.counter = itertools.count(start + 1)
        self.store_path = out / "store.json"
        self.store: dict[str, str] = json.loads(self.store_path.read_text()) if self.store_path.exists() else {}

    def control(self) -> str:
        try:
            return (self.out / "control").read_text().strip() or "ok"
        except FileNotFoundError:
            return "ok"

    def record(self, record: dict[str, Any]) -> None:
        with self.lock:
            n = next(self.counter)
            record["n"] = n
            tmp = self.requests_dir / f".{n:04d}.tmp"
            tmp.write_text(json.dumps(record, indent=1))
            tmp.replace(self.requests_dir / f"{n:04d}.json")

    def conditional_create(self, bundle: dict[str, Any]) -> tuple[list[dict[str, Any]], str, bool]:
        """Transaction-response entries, the DiagnosticReport's location, whether anything was created."""
        response_entries = []
        report_location = ""
        created_any = False
        with self.lock:
            for entry in bundle.get("entry") or []:
                rtype = entry["resource"]["resourceType"]
                key = f"{rtype}?{unquote(entry['request'].get('ifNoneExist', '')) or uuid.uuid4()}"
                if key in self.store:
                    location, status = self.store[key], "200 OK"
                else:
                    location, status = f"{rtype}/{uuid.uuid4().hex[:16]}/_history/1", "201 Created"
                    self.store[key] = location
                    created_any = True
                response_entries.append({"response": {"status": status, "location": location}})
                if rtype == "DiagnosticReport":
                    report_location = location
            self.store_path.write_text(json.dumps(self.store, indent=1))
        return response_entries, report_location, created_any


class _Handler(BaseHTTPRequestHandler):
    server_version = "cxr-node-test-receiver/1"
    state: _State  # set on the subclass in main()

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write("receiver: " + (format % args) + "\n")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        control = self.state.control()
        record: dict[str, Any] = {
            "method": "POST",
            "path": self.path,
            "headers": dict(self.headers.items()),
            "body": body.decode("utf-8", "replace"),
            "control": control,
            "received_at": time.time(),
        }
        if control == "hang":
            record["answer"] = "hang"
            self.state.record(record)
            time.sleep(3600)
            return
        if control == "drop":
            record["answer"] = "drop"
            self.state.record(record)
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if control.isdigit():
            status = int(control)
            answer: dict[str, Any] = (
                _outcome("exception", f"test receiver told to answer {status}")
                if self.state.mode == "fhir"
                else {"error": f"told to answer {status}"}
            )
            self._answer(record, status, answer, [])
            return
        if self.state.mode == "fhir":
            self._fhir(record, body)
        else:
            self._webhook(record, body)

    def _answer(
        self,
        record: dict[str, Any],
        status: int,
        answer: dict[str, Any],
        problems: list[str],
        headers: dict[str, str] | None = None,
    ) -> None:
        record.update(answer=status, problems=problems, response=answer)
        self.state.record(record)
        data = json.dumps(answer).encode()
        self.send_response(status)
        content_type = "application/fhir+json" if self.state.mode == "fhir" else "application/json"
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _fhir(self, record: dict[str, Any], body: bytes) -> None:
        if self.path.rstrip("/") != FHIR_PATH:
            self._answer(record, 404, _outcome("not-found", f"no endpoint {self.path}"), ["wrong path"])
            return
        auth = self.headers.get("Authorization", "")
        if self.state.token and auth != f"Bearer {self.state.token}":
            problem = "missing bearer token" if not auth else "invalid bearer token"
            self._answer(
                record, 401, _outcome("login", problem), [problem], {"WWW-Authenticate": 'Bearer realm="fhir"'}
            )
            return
        content_type = self.headers.get("Content-Type", "")
        if not content_type.startswith("application/fhir+json"):
            problem = f"content type {content_type!r} is not application/fhir+json"
            self._answer(record, 415, _outcome("not-supported", problem), [problem])
            return
        try:
            data = json.loads(body)
        except ValueError as e:
            self._answer(record, 400, _outcome("structure", f"body is not JSON: {e}"), ["not JSON"])
            return
        problems = check_fhir_bundle(data)
        if problems:
            self._answer(record, 400, _outcome("invalid", "; ".join(problems)), problems)
            return
        entries, location, created = self.state.conditional_create(data)
        record["created"] = created
        self._answer(
            record,
            201 if created else 200,
            {"resourceType": "Bundle", "type": "transaction-response", "entry": entries},
            [],
            {"Location": location} if location else {},
        )

    def _webhook(self, record: dict[str, Any], body: bytes) -> None:
        if self.path.rstrip("/") != WEBHOOK_PATH:
            self._answer(record, 404, {"error": f"no endpoint {self.path}"}, ["wrong path"])
            return
        problems = []
        if not self.headers.get("Content-Type", "").startswith("application/json"):
            problems.append("content type is not application/json")
        problem = independent_verify(
            self.state.secret,
            self.headers.get("X-CXRNode-Timestamp", ""),
            self.headers.get("X-CXRNode-Signature", ""),
            body,
        )
        if problem:
            self._answer(record, 401, {"error": problem}, [problem])
            return
        try:
            data = json.loads(body)
        except ValueError:
            data = {}
            problems.append("body is not JSON")
        if data.get("alert_id") != self.headers.get("X-CXRNode-Alert-Id"):
            problems.append("X-CXRNode-Alert-Id differs from the body's alert_id")
        if problems:
            self._answer(record, 400, {"error": "; ".join(problems)}, problems)
            return
        with self.state.lock:
            key = f"alert?{data['alert_id']}"
            duplicate = key in self.state.store
            self.state.store[key] = "seen"
            self.state.store_path.write_text(json.dumps(self.state.store, indent=1))
        record["duplicate"] = duplicate
        self._answer(record, 200, {"received": data["alert_id"], "duplicate": duplicate}, [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", choices=("fhir", "webhook"), required=True)
    parser.add_argument("--token", default="")
    parser.add_argument("--secret", default="")
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    handler = type("Handler", (_Handler,), {"state": _State(args.out, args.mode, args.token, args.secret)})
    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    (args.out / "ready").write_text(f"{os.getpid()} {args.port}\n")
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        server.server_close()
    return 0


# ------------------------------------------------------------------------------------ the test side


def sample_alert(**overrides: Any) -> TriageAlert:
    """A fully filled TriageAlert (critical, pneumothorax, worsening severity, experimental model)."""
    values: dict[str, Any] = dict(
        alert_id="3f2a9c1e-7d4b-4e8a-9b1c-2d3e4f5a6b7c",
        created_at="2026-12-02T23:40:05+00:00",
        level="critical",
        reasons=["pneumothorax probability 0.91 >= 0.5", "severity up by 2 >= 2"],
        study_instance_uid="1.2.826.0.1.3680043.8.498.10001",
        accession_number="ACC-2026-0042",
        revision=1,
        severity_score=5,
        severity_change=2,
        prior=Prior(study_instance_uid="1.2.826.0.1.3680043.8.498.9000", study_date="20261115", severity_score=3),
        pneumothorax_present=True,
        pneumothorax_probability=0.9134,
        pneumothorax_side="right",
        source_sop_instance_uid="1.2.826.0.1.3680043.8.498.10001.1.1",
        source_series_instance_uid="1.2.826.0.1.3680043.8.498.10001.1",
        models=[
            AlertModel("lung", "2.1.0", "validated"),
            AlertModel("opacity", "1.4.0", "validated"),
            AlertModel("pneumothorax", "0.9.0", "experimental"),
        ],
        experimental=True,
        note=NOT_FOR_DIAGNOSTIC_USE,
        patient_id="PID-778899",
        issuer_of_patient_id="1.2.826.0.1.3680043.8.498.77",
        patient_name="Doe^Jane^Q",
        patient_birth_date="19610304",
        patient_sex="F",
        study_date="20261202",
        study_time="233012",
    )
    values.update(overrides)
    return TriageAlert(**values)


class HTTPReceiver:
    """``with HTTPReceiver(tmp_path / "fhir", "fhir", token="t") as rx:`` → ``rx.url``, ``rx.requests()``.

    ``stop()`` and ``start()`` again keep the port (down → up); ``behave("500")`` switches the answer.
    """

    def __init__(
        self,
        folder: Path,
        mode: str,
        *,
        token: str = "",
        secret: str = "",
        cert: Path | None = None,
        key: Path | None = None,
    ) -> None:
        self.folder = folder
        self.mode = mode
        self.token = token
        self.secret = secret
        self.cert = cert
        self.key = key
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = folder / "receiver.log"

    @property
    def url(self) -> str:
        scheme = "https" if self.cert else "http"
        return f"{scheme}://127.0.0.1:{self.port}{FHIR_PATH if self.mode == 'fhir' else WEBHOOK_PATH}"

    def start(self) -> HTTPReceiver:
        self.folder.mkdir(parents=True, exist_ok=True)
        ready = self.folder / "ready"
        ready.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "tests.support.http_receiver",
            "--port",
            str(self.port),
            "--out",
            str(self.folder),
            "--mode",
            self.mode,
            "--token",
            self.token,
            "--secret",
            self.secret,
        ]
        if self.cert and self.key:
            cmd += ["--cert", str(self.cert), "--key", str(self.key)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: self._exited() or ready.exists(), 20, f"HTTP receiver on port {self.port}")
        except TimeoutError:
            self.stop()
            raise
        if self._exited():
            raise RuntimeError(f"HTTP receiver exited: {self.log_path.read_text()[-2000:]}")
        return self

    def _exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def behave(self, control: str) -> None:
        """``ok``, an HTTP status (``"500"``), ``hang`` or ``drop``: used from the next request on."""
        (self.folder / "control").write_text(control + "\n")

    def requests(self) -> list[dict[str, Any]]:
        folder = self.folder / "requests"
        return [json.loads(p.read_text()) for p in sorted(folder.glob("[0-9]*.json"))]

    def __enter__(self) -> HTTPReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
