"""STOW-RS ingest: `POST /dicomweb/studies` and `/dicomweb/studies/{study}` on the dicomweb port.

A request is one audited "association" (protocol ``stow-rs``, calling AE = the source its bearer token
names). What happens, in order:

1. No, unknown or revoked token: 401 (``WWW-Authenticate: Bearer``), a rejected association row.
2. Content-Type not ``multipart/related; type="application/dicom"``: 415; no boundary: 400.
3. A declared Content-Length above ``dicomweb.max_request_mb``: 413 before any byte is read.
4. Free disk below ``storage.min_free_mb``: 503 with Retry-After, before any byte of the body is kept.
5. The body streams into one spool file per part (:mod:`node.dicomweb.multipart`): a body that passes the
   limit (413) or is not valid multipart (400) leaves nothing behind; each of these is a rejected row.
6. Only once the whole body is in does ingest see the parts, one by one, through
   :meth:`node.ingest.accept.Ingest.receive`: the same checks, quarantine, persist-before-answer, routing and
   audit as C-STORE. Its status becomes the part's FailureReason in the response (200/202/409).

The refusals before ingest read (and drop) what is left of the body, up to :data:`DRAIN_LIMIT`: a client
still sending when the server closes gets a reset instead of its answer.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from node.dicomweb import results, tokens
from node.dicomweb.multipart import (
    BodyTooLarge,
    MalformedBody,
    Part,
    PartSpooler,
    UnsupportedMediaType,
    stow_boundary,
)
from node.dicomweb.response import (
    JSON_TYPE,
    XML_TYPE,
    InstanceResult,
    accepts_xml,
    http_status,
    response_dataset,
    to_json,
    to_xml,
)
from node.ingest.accept import Ingest, Outcome, StoreRequest
from node.ingest.header import STATUS_CANNOT_UNDERSTAND
from node.runtime import metrics
from node.runtime.config import Settings

log = logging.getLogger(__name__)

MIB = 1024 * 1024
DRAIN_LIMIT = 64 * MIB  # after an early refusal, read at most this much more of the body before closing
DRAIN_TIMEOUT_S = 10.0
BATCH = MIB  # body bytes handed from the event loop to the request's thread at once
_STUDIES = re.compile(r"^/dicomweb/studies(?:/([0-9.]{1,64}))?/?$")
_UID = r"([0-9.]{1,64})"
_QIDO = re.compile(rf"^/dicomweb/studies/{_UID}/instances/?$")
_WADO = re.compile(rf"^/dicomweb/studies/{_UID}/series/{_UID}/instances/{_UID}/?$")


#: Every HTTP status STOW-RS answers and when (docs/conformance.md is generated from this).
HTTP_STATUSES: dict[int, str] = {
    200: "every instance stored (or already stored: a duplicate counts as stored)",
    204: "QIDO-RS: the node has no result object for this study",
    202: "some instances stored, some failed: see FailedSOPSequence",
    409: "no instance stored: every one failed (FailedSOPSequence says why)",
    400: "the body is not valid multipart/related (no boundary, broken framing, ended early, no part)",
    408: "the client sent no byte of its body for `dicomweb.idle_timeout_s`: answered and disconnected",
    401: "no bearer token, or one that is unknown or revoked (`WWW-Authenticate: Bearer`)",
    404: "a path other than /dicomweb/studies[/{StudyInstanceUID}]",
    405: "a method other than POST (GET only for the result objects: QIDO-RS, WADO-RS)",
    413: "the body is larger than `dicomweb.max_request_mb` (from Content-Length, or found while streaming), or has "
    "more than `dicomweb.max_parts` parts",
    415: 'Content-Type is not multipart/related; type="application/dicom"',
    500: "an internal error of the node (its log has the details; the client gets none)",
    503: "free disk below `storage.min_free_mb`, checked before the body is read (`Retry-After: 60`), as "
    "C-STORE associations are then rejected (transient)",
}


class ClientGone(Exception):
    """The client disconnected before its body ended."""


class ClientIdle(ClientGone):
    """The client sent nothing of its body for dicomweb.idle_timeout_s: answered 408 and disconnected."""


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    peer_host: str = ""
    peer_port: int | None = None


@dataclass
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


class StowService:
    """The STOW-RS handler, independent of the HTTP server: `handle` is synchronous (run it in a thread)."""

    def __init__(self, settings: Settings, ingest: Ingest) -> None:
        self.settings = settings
        self.ingest = ingest
        self.store = ingest.store

    def handle(self, req: HttpRequest, body: Iterator[bytes]) -> HttpResponse:
        if req.method == "GET" and (_QIDO.match(req.path) or _WADO.match(req.path)):
            return self._results(req)
        m = _STUDIES.match(req.path)
        if m is None:
            return HttpResponse(404, b"not found: STOW-RS is POST /dicomweb/studies[/{StudyInstanceUID}]\n")
        if req.method != "POST":
            return HttpResponse(405, b"only POST (STOW-RS) is served here\n", headers={"Allow": "POST"})
        source = tokens.source_for(self.store, req.headers.get("authorization", ""))
        if source is None:
            why = (
                "no bearer token"
                if tokens.bearer_token(req.headers.get("authorization", "")) is None
                else "unknown or revoked bearer token"
            )
            return self._refuse(req, body, "", 401, why, {"WWW-Authenticate": 'Bearer realm="cxr-node STOW-RS"'})
        try:
            boundary = stow_boundary(req.headers.get("content-type", ""))
        except UnsupportedMediaType as e:
            return self._refuse(req, body, source, 415, str(e))
        except MalformedBody as e:
            return self._refuse(req, body, source, 400, str(e))
        limit = self.settings.dicomweb.max_request_mb * MIB
        declared = _content_length(req.headers)
        if declared is not None and declared > limit:
            return self._refuse(
                req, body, source, 413, f"Content-Length {declared} exceeds dicomweb.max_request_mb ({limit} bytes)"
            )
        spool, min_free = self.ingest.spool, self.settings.storage.min_free_mb
        if not spool.has_room(min_free):
            return self._refuse(
                req,
                body,
                source,
                503,
                f"free disk {spool.free_mb():.0f} MB below storage.min_free_mb {min_free}",
                {"Retry-After": "60"},
            )
        spooler = PartSpooler(
            boundary,
            self.ingest.spool.incoming,
            max_part_bytes=self.settings.storage.max_instance_mb * MIB,
            max_body_bytes=limit,
            max_parts=self.settings.dicomweb.max_parts,
        )
        try:
            for chunk in body:
                spooler.write(chunk)
            parts = spooler.finish()
        except BodyTooLarge as e:
            spooler.discard()
            return self._refuse(req, body, source, 413, str(e))
        except MalformedBody as e:
            spooler.discard()
            return self._refuse(req, body, source, 400, str(e))
        except BaseException:
            spooler.discard()
            raise
        return self._ingest(req, source, parts, m.group(1) or "")

    # -- QIDO-RS / WADO-RS of the node's own results (node.dicomweb.results) ---------------------------

    def _results(self, req: HttpRequest) -> HttpResponse:
        source = tokens.source_for(self.store, req.headers.get("authorization", ""))
        if source is None:
            return self._refuse(
                req,
                iter(()),
                "",
                401,
                "no, unknown or revoked bearer token",
                {"WWW-Authenticate": 'Bearer realm="cxr-node DICOMweb"'},
            )
        base = f"{'https' if self.settings.dicomweb.tls else 'http'}://{req.headers.get('host', '')}/dicomweb"
        if m := _QIDO.match(req.path):
            found = results.search(self.store, m.group(1), base)
            self.store.add_event(
                "dicomweb.search",
                actor=f"dicomweb:{source}",
                detail={"study_instance_uid": m.group(1), "found": len(found), "peer": req.peer_host},
            )
            return HttpResponse(200 if found else 204, results.to_json(found) if found else b"", JSON_TYPE)
        m = _WADO.match(req.path)
        assert m is not None
        path = results.find(self.store, m.group(1), m.group(2), m.group(3))
        self.store.add_event(
            "dicomweb.retrieve",
            actor=f"dicomweb:{source}",
            detail={"sop_instance_uid": m.group(3), "found": path is not None, "peer": req.peer_host},
        )
        if path is None:
            return HttpResponse(404, b"no such result object of this node\n")
        data, content_type = results.multipart(path)
        return HttpResponse(200, data, content_type)

    # -- the body is in: each part through ingest ---------------------------------------------------

    def _ingest(self, req: HttpRequest, source: str, parts: list[Part], study: str) -> HttpResponse:
        association_id = self.store.record_association(
            calling_ae=source,
            called_ae=self.settings.dicom.ae_title,
            peer_host=req.peer_host,
            peer_port=req.peer_port,
            result="accepted",
            tls=self.settings.dicomweb.tls,
            protocol="stow-rs",
        )
        peer = f"{req.peer_host}:{req.peer_port}"
        answers: list[InstanceResult] = []
        counts = {"stored": 0, "duplicate": 0, "failed": 0}
        try:
            for n, part in enumerate(parts, 1):
                started = time.perf_counter()
                request = StoreRequest(
                    affected_sop_class="",
                    affected_sop_instance="",
                    transfer_syntax_uid="",
                    calling_ae=source,
                    association_id=association_id,
                    peer=peer,
                    received_bytes=part.received,
                    study_instance_uid=study,
                )
                metrics.count_received_bytes(part.received)
                if not part.is_dicom:
                    outcome = self.ingest.refuse(
                        part.path,
                        request,
                        STATUS_CANNOT_UNDERSTAND,
                        f"part {n} is {part.content_type}, not application/dicom",
                    )
                else:
                    _add_file_meta(part.path)
                    outcome = self.ingest.receive(part.path, request)
                metrics.observe_stage("persist", time.perf_counter() - started)
                metrics.count_store_status(outcome.status)
                counts[outcome.kind if outcome.kind in ("stored", "duplicate") else "failed"] += 1
                answers.append(self._result(outcome))
        finally:
            for part in parts:  # only what ingest did not take (an exception above)
                part.path.unlink(missing_ok=True)
            self.store.end_association(association_id, "released", **counts)
        status = http_status(answers)
        log.info(
            "STOW-RS from %s@%s: %d part(s), %d stored, %d duplicate, %d failed -> %d",
            source,
            peer,
            len(parts),
            counts["stored"],
            counts["duplicate"],
            counts["failed"],
            status,
        )
        ds = response_dataset(answers)
        if accepts_xml(req.headers.get("accept", "")):
            return HttpResponse(status, to_xml(ds), XML_TYPE)
        return HttpResponse(status, to_json(ds), JSON_TYPE)

    def _result(self, outcome: Outcome) -> InstanceResult:
        sop_class = sop_instance = ""
        if outcome.instance_id is not None:
            row = self.store.get_instance(outcome.instance_id)
            sop_class, sop_instance = row.sop_class_uid, row.sop_instance_uid
        if outcome.kind not in ("stored", "duplicate"):
            return InstanceResult(sop_class, sop_instance, outcome.status, outcome.reason)
        warning = outcome.status if outcome.warned else None
        return InstanceResult(sop_class, sop_instance, None, outcome.reason, warning_reason=warning)

    # -- refusals before ingest -------------------------------------------------------------------------

    def _refuse(
        self,
        req: HttpRequest,
        body: Iterator[bytes],
        source: str,
        status: int,
        reason: str,
        headers: dict[str, str] | None = None,
    ) -> HttpResponse:
        """Audit (a rejected association row with the reason), drain the body, answer `status` with the reason."""
        log.warning(
            "STOW-RS request from %s%s refused with %d: %s",
            f"{source}@" if source else "",
            req.peer_host,
            status,
            reason,
        )
        metrics.count_association("rejected", f"stow-{status}")
        self.store.record_association(
            calling_ae=source,
            called_ae=self.settings.dicom.ae_title,
            peer_host=req.peer_host,
            peer_port=req.peer_port,
            result="rejected",
            reason=f"HTTP {status}: {reason}",
            tls=self.settings.dicomweb.tls,
            protocol="stow-rs",
        )
        _drain(body)
        return HttpResponse(status, (reason + "\n").encode(), headers={**(headers or {}), "Connection": "close"})


def _content_length(headers: dict[str, str]) -> int | None:
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        return None


def _drain(body: Iterator[bytes]) -> None:
    deadline, read = time.monotonic() + DRAIN_TIMEOUT_S, 0
    try:
        for chunk in body:
            read += len(chunk)
            if read > DRAIN_LIMIT or time.monotonic() > deadline:
                return
    except ClientGone:
        return


def _add_file_meta(path: Path) -> None:
    """A part that is a bare data set (no preamble, no "DICM"): given the file meta the node writes for every
    C-STORE, so the spool holds PS3.10 files only. The encoding is the one pydicom finds in the data set."""
    with open(path, "rb") as f:
        head = f.read(132)
    if (len(head) == 132 and head[128:132] == b"DICM") or not head:
        return
    try:
        ds = dcmread(path, force=True, stop_before_pixels=True)
        sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    except Exception:  # noqa: BLE001 — not readable: ingest refuses it with the reason
        return
    implicit, little = ds.original_encoding
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UID(sop_class), UID(sop_instance)
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    tmp = path.with_suffix(".meta")
    with open(tmp, "wb") as out, open(path, "rb") as src:
        out.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(out, meta)  # type: ignore[arg-type]
        while chunk := src.read(MIB):
            out.write(chunk)
    tmp.replace(path)


# -- the HTTP server ------------------------------------------------------------------------------------


class StowApp:
    """An ASGI app around :class:`StowService`: the request runs in a worker thread, reading the body from
    the event loop chunk by chunk as it parses (back-pressure: the client is read as fast as the disk takes)."""

    def __init__(self, service: StowService) -> None:
        self.service = service

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Any], send: Callable[[Any], Any]) -> None:  # noqa: C901 — one ASGI request
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        client = scope.get("client") or ("", None)
        req = HttpRequest(scope["method"], scope["path"], headers, str(client[0]), client[1])

        idle = self.service.settings.dicomweb.idle_timeout_s

        async def next_message() -> Any:
            """The next body message, or several joined up to BATCH bytes: one hop between the event loop and
            the request's thread per MiB instead of per socket read (64 KiB)."""
            chunks: list[bytes] = []
            size = 0
            while True:
                with anyio.move_on_after(idle) as scope:
                    msg = await receive()
                if scope.cancelled_caught:
                    msg = {"type": "cxrnode.idle"}
                if msg["type"] != "http.request":
                    if chunks:  # what came before the disconnect or the silence first; that again next time
                        return {"type": "http.request", "body": b"".join(chunks), "more_body": True}
                    return msg
                chunks.append(msg.get("body", b""))
                size += len(chunks[-1])
                if size >= BATCH or not msg.get("more_body", False):
                    return {"type": "http.request", "body": b"".join(chunks), "more_body": msg.get("more_body", False)}

        def body() -> Iterator[bytes]:
            while True:
                msg = anyio.from_thread.run(next_message)
                if msg["type"] == "cxrnode.idle":
                    raise ClientIdle(f"no byte of the body for {idle:g} s (dicomweb.idle_timeout_s): dropped")
                if msg["type"] == "http.disconnect":
                    raise ClientGone("client disconnected before the end of the body")
                if chunk := msg.get("body", b""):
                    yield chunk
                if not msg.get("more_body", False):
                    return

        try:
            rsp = await anyio.to_thread.run_sync(self._handle, req, body)
        except ClientGone:
            return
        raw_headers = [
            (b"content-type", rsp.content_type.encode()),
            (b"content-length", str(len(rsp.body)).encode()),
            *((k.lower().encode(), v.encode()) for k, v in rsp.headers.items()),
        ]
        await send({"type": "http.response.start", "status": rsp.status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": rsp.body})

    def _handle(self, req: HttpRequest, body: Callable[[], Iterator[bytes]]) -> HttpResponse:
        try:
            return self.service.handle(req, body())
        except ClientGone as e:
            self.service.store.record_association(
                calling_ae="",
                called_ae=self.service.settings.dicom.ae_title,
                peer_host=req.peer_host,
                peer_port=req.peer_port,
                result="rejected",
                reason=str(e),
                protocol="stow-rs",
            )
            log.warning("STOW-RS request from %s ended: %s", req.peer_host, e)
            if isinstance(e, ClientIdle):
                return HttpResponse(408, f"{e}\n".encode(), headers={"Connection": "close"})
            raise
        except Exception:  # the node's own fault: logged here, never a traceback to the client
            log.exception("STOW-RS request from %s failed inside the node", req.peer_host)
            return HttpResponse(500, b"internal error of the receiving node\n")


@dataclass
class StowServer:
    """The uvicorn server of STOW-RS on its own thread (see node.web.server for the console's)."""

    server: Any
    thread: threading.Thread
    port: int
    scheme: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/dicomweb"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_stow(settings: Settings, ingest: Ingest) -> StowServer:
    """Bind dicomweb.host:port (errors at once, like the console) and serve STOW-RS in a thread."""
    import uvicorn

    from node.web.server import bind_socket

    cfg = settings.dicomweb
    sock = bind_socket(cfg.host, cfg.port)
    config = uvicorn.Config(
        StowApp(StowService(settings, ingest)),
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
        proxy_headers=False,
        ssl_certfile=str(cfg.tls_cert_file) if cfg.tls else None,
        ssl_keyfile=str(cfg.tls_key_file) if cfg.tls else None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="cxrnode-stow", daemon=True)
    thread.start()
    stow = StowServer(server, thread, int(sock.getsockname()[1]), "https" if cfg.tls else "http")
    log.info("STOW-RS on %s:%d%s (POST /dicomweb/studies)", cfg.host, stow.port, " (TLS)" if cfg.tls else "")
    return stow
