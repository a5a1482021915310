"""STOW-RS out: deliver result objects to a DICOMweb destination (an AE table entry with a URL).

The counterpart of :func:`node.export.sender.send` for a destination reached over HTTP: one request per batch,
the files streamed into the multipart/related body (never the whole batch in memory), and the answer
turned into the same :class:`node.export.sender.FileStatus` per object, so that :mod:`node.export.exporter` retries,
backs off and dead-letters exactly as for C-STORE. A refused request raises :class:`node.export.sender.SendError`:
retryable when waiting may help (no connection, timeout, 408/429/5xx), not when it cannot (401/403, 400,
404, 413, 415: the configuration or the objects must change first).
"""

from __future__ import annotations

import logging
import ssl
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
from pydicom.dataset import Dataset

from node.export.sender import UNREADABLE, FileStatus, SendError, client_ssl_context
from node.runtime.config import TLSConfig

log = logging.getLogger(__name__)

CHUNK = 1 << 20
RETRYABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class StowDestination:
    name: str
    url: str  # DICOMweb base URL; instances go to url + "/studies"
    auth: str = "none"  # none | bearer | basic
    username: str = ""
    secret: str = ""


@dataclass(frozen=True)
class _Item:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    size: int


def send_stow(
    files: Sequence[str | Path],
    destination: StowDestination,
    *,
    timeout_s: float = 30.0,
    verify: ssl.SSLContext | bool = True,
) -> list[FileStatus]:
    """POST `files` in one STOW-RS request; one FileStatus per file, in order (see the module docstring)."""
    items: list[_Item | FileStatus] = [_read(Path(f)) for f in files]
    ready = [i for i in items if isinstance(i, _Item)]
    if not ready:
        return [i for i in items if isinstance(i, FileStatus)]
    boundary = uuid.uuid4().hex
    heads = [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() for _ in ready]
    tail = f"--{boundary}--\r\n".encode()
    length = sum(len(h) + i.size + 2 for h, i in zip(heads, ready, strict=True)) + len(tail)

    def body() -> Iterator[bytes]:
        for head, item in zip(heads, ready, strict=True):
            yield head
            with open(item.path, "rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk
            yield b"\r\n"
        yield tail

    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Content-Length": str(length),
        "Accept": "application/dicom+json",
    }
    auth: httpx.Auth | None = None
    if destination.auth == "bearer":
        headers["Authorization"] = f"Bearer {destination.secret}"
    elif destination.auth == "basic":
        auth = httpx.BasicAuth(destination.username, destination.secret)
    url = destination.url.rstrip("/") + "/studies"
    log.info("STOW-RS of %d object(s) to %s at %s", len(ready), destination.name, url)
    try:
        with httpx.Client(timeout=timeout_s, verify=verify, auth=auth) as client:
            rsp = client.post(url, content=body(), headers=headers)
    except httpx.HTTPError as e:
        raise SendError(f"STOW-RS to {destination.name} at {url} failed: {type(e).__name__}: {e}") from e
    if rsp.status_code not in (200, 202, 409):
        text = " ".join(rsp.text.split())[:200]
        raise SendError(
            f"STOW-RS to {destination.name} at {url} answered HTTP {rsp.status_code}{': ' + text if text else ''}",
            retryable=rsp.status_code in RETRYABLE_HTTP,
        )
    answered = _answers(rsp)
    out: list[FileStatus] = []
    for item in items:
        if isinstance(item, FileStatus):
            out.append(item)
            continue
        status = answered.get(item.sop_instance_uid)
        if status is None and rsp.status_code == 200 and not answered:
            status = 0  # 200 with no per-instance detail: all stored
        error = (
            None
            if status == 0
            else (
                f"STOW-RS FailureReason 0x{status:04X}"
                if status is not None
                else f"not in the STOW-RS response (HTTP {rsp.status_code})"
            )
        )
        out.append(FileStatus(item.sop_instance_uid, item.sop_class_uid, status, error, item.path))
    return out


def https_verify(tls: TLSConfig) -> ssl.SSLContext | bool:
    """HTTPS destinations are verified against dicom.tls.ca_file when set, else the system's CAs."""
    return client_ssl_context(tls.ca_file, tls.cert_file, tls.key_file) if tls.ca_file else True


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    status: int | None  # HTTP status, None when no answer came
    detail: str
    seconds: float


def probe(
    destination: StowDestination, *, timeout_s: float = 10.0, verify: ssl.SSLContext | bool = True
) -> ProbeResult:
    """The STOW-RS counterpart of a C-ECHO: one QIDO-RS search (`GET <url>/studies?limit=1`) with the
    destination's credentials, so a wrong URL, host or password shows before results are due."""
    url = destination.url.rstrip("/") + "/studies"
    headers = {"Accept": "application/dicom+json"}
    auth: httpx.Auth | None = None
    if destination.auth == "bearer":
        headers["Authorization"] = f"Bearer {destination.secret}"
    elif destination.auth == "basic":
        auth = httpx.BasicAuth(destination.username, destination.secret)
    start = time.perf_counter()
    try:
        with httpx.Client(timeout=timeout_s, verify=verify, auth=auth) as client:
            rsp = client.get(url, params={"limit": "1"}, headers=headers)
    except httpx.HTTPError as e:
        return ProbeResult(False, None, f"{url}: {type(e).__name__}: {e}", time.perf_counter() - start)
    seconds = time.perf_counter() - start
    if rsp.status_code in (200, 204):
        return ProbeResult(True, rsp.status_code, "success", seconds)
    return ProbeResult(False, rsp.status_code, f"{url} answered HTTP {rsp.status_code}", seconds)


def _read(path: Path) -> _Item | FileStatus:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return _Item(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), path.stat().st_size)
    except Exception as e:  # noqa: BLE001 — a disk or programming error, not the peer's: never retried
        return FileStatus("", "", None, f"{UNREADABLE}: {path}: {type(e).__name__}: {e}", path)


def _answers(rsp: httpx.Response) -> dict[str, int]:
    """SOP Instance UID -> 0 (in ReferencedSOPSequence) or its FailureReason (FailedSOPSequence)."""
    try:
        ds = Dataset.from_json(rsp.json()) if rsp.content else Dataset()
    except Exception:  # noqa: BLE001 — whatever the peer sent: its statuses are then unknown
        log.warning("STOW-RS response is not DICOM JSON (%s)", rsp.headers.get("content-type"))
        return {}
    out: dict[str, int] = {}
    for item in ds.get("ReferencedSOPSequence", []):
        out[str(item.get("ReferencedSOPInstanceUID", ""))] = 0
    for item in ds.get("FailedSOPSequence", []):
        out[str(item.get("ReferencedSOPInstanceUID", ""))] = int(item.get("FailureReason", 0x0110))
    return out
