"""C-STORE SCU and C-ECHO: deliver result objects to one destination on one association.

`send` opens ONE association per destination and batch and proposes, for every SOP class in the
batch, the transfer syntax each object is stored in (plus the other uncompressed syntaxes, which
pynetdicom can re-encode to). A destination that cannot be reached, rejects or aborts the
association raises `SendError` with the reason and whether a retry may help; a refused object comes
back as a failed `FileStatus` (with `retryable`) and the others still go. Retries, backoff
(`backoff_delay`) and the dead letter belong to the caller, node.export.exporter, which keeps them
in the exports table: no database imports here."""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT

from node.runtime.config import SenderConfig, TLSConfig, TriageConfig

log = logging.getLogger(__name__)

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
#: C-STORE statuses worth another attempt later: out of resources (PS3.4 B.2.3) and "no response".
RETRYABLE_STATUS_PREFIXES = (0xA7,)
UNREADABLE = "cannot read object"
NO_CONTEXT = "no accepted presentation context"
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255


class SendError(Exception):
    """The association could not be used; `retryable` is False when retrying cannot help."""

    def __init__(self, reason: str, *, retryable: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int
    tls: bool = False


@dataclass(frozen=True)
class FileStatus:
    """What happened to one object. `status` is the C-STORE status, None when none was received."""

    sop_instance_uid: str
    sop_class_uid: str
    status: int | None
    error: str | None = None
    path: Path | None = None

    @property
    def ok(self) -> bool:
        """Stored: success (0x0000) or a warning (0xB000, 0xB006, 0xB007: stored with remarks)."""
        return self.status is not None and (self.status == 0x0000 or (self.status >> 12) == 0xB)

    @property
    def retryable(self) -> bool:
        if self.ok:
            return False
        if self.status is None:
            return self.error is None or not self.error.startswith((NO_CONTEXT, UNREADABLE))
        return (self.status >> 8) in RETRYABLE_STATUS_PREFIXES


Item = Path | str | Dataset


def send(
    items: Sequence[Item],
    destination: Destination,
    *,
    calling_ae: str,
    timeout_s: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> list[FileStatus]:
    """Send all `items` (files or data sets) on one association; one FileStatus per item, in order.

    Raises SendError when the association cannot be established (unreachable, rejected, aborted
    during negotiation, TLS failure). An object that cannot be read, or whose SOP class/transfer
    syntax the peer did not accept, gets a failed, non-retryable FileStatus; the others still go.
    """
    return _send([_load(item) for item in items], destination, calling_ae, timeout_s, ssl_context)


def _send(
    items: Sequence[_Loaded | FileStatus],
    destination: Destination,
    calling_ae: str,
    timeout_s: float,
    ssl_context: ssl.SSLContext | None,
) -> list[FileStatus]:
    loaded = [item for item in items if isinstance(item, _Loaded)]
    if not loaded:
        return [item for item in items if isinstance(item, FileStatus)]
    watch = _AssociationWatch()
    assoc = _associate(loaded, destination, calling_ae, timeout_s, ssl_context, watch)
    if assoc is None:  # negotiated, but the peer took none of the contexts: per-object refusals
        return [item if isinstance(item, FileStatus) else _no_context(item) for item in items]
    statuses: list[FileStatus] = []
    broken: str | None = None  # once a C-STORE got no response, the association is not used again
    try:
        for item in items:
            if isinstance(item, FileStatus):
                statuses.append(item)
            elif broken is not None:
                statuses.append(
                    FileStatus(item.sop_instance_uid, item.sop_class_uid, None, f"not sent: {broken}", item.path)
                )
            else:
                status = _store(assoc, item, watch)
                if status.status is None and status.error is not None and not status.error.startswith(NO_CONTEXT):
                    broken = status.error
                statuses.append(status)
        return statuses
    finally:
        if broken is not None and assoc.is_established:
            assoc.abort()
        elif assoc.is_established:
            assoc.release()


def _open(
    destination: Destination,
    calling_ae: str,
    timeout_s: float,
    ssl_context: ssl.SSLContext | None,
    contexts: list[Any],
    watch: _AssociationWatch,
    purpose: str,
    extra_handlers: Sequence[Any] = (),
) -> Association:
    """Request an association to `destination` (TLS when it says so, verified like every outgoing one)."""
    if destination.tls and ssl_context is None:
        raise SendError(
            f"destination {destination.ae_title} needs TLS but no TLS context is configured", retryable=False
        )
    ae = AE(ae_title=calling_ae)
    for timeout in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, timeout, timeout_s)
    ae.requested_contexts = contexts
    # The peer's certificate is checked against its configured host name (server_hostname), as HTTPS does.
    tls_args = (ssl_context, destination.host) if destination.tls and ssl_context is not None else None
    log.info(
        "association to %s@%s:%d%s for %s",
        destination.ae_title,
        destination.host,
        destination.port,
        " (TLS)" if tls_args else "",
        purpose,
    )
    return ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=tls_args,
        evt_handlers=[*watch.handlers(), *extra_handlers],
    )


def _associate(
    loaded: Sequence[_Loaded],
    destination: Destination,
    calling_ae: str,
    timeout_s: float,
    ssl_context: ssl.SSLContext | None,
    watch: _AssociationWatch,
) -> Association | None:
    """An established association, None when the peer accepted no context, else SendError."""
    contexts = _contexts(loaded)
    if len(contexts) > MAX_CONTEXTS:
        raise SendError(
            f"{len(contexts)} presentation contexts needed, at most {MAX_CONTEXTS}: split the batch", retryable=False
        )
    assoc = _open(destination, calling_ae, timeout_s, ssl_context, contexts, watch, f"{len(loaded)} objects")
    if assoc.is_established:
        return assoc
    if watch.connected and watch.rejection is None and assoc.rejected_contexts and not assoc.accepted_contexts:
        return None  # pynetdicom aborts an association with no accepted context
    if not watch.connected:  # pynetdicom only logs why: ask the network ourselves
        raise _diagnose_connect(destination, ssl_context if destination.tls else None, timeout_s)
    raise watch.error(destination)


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    status: int | None  # the C-ECHO status, None when there was no response
    detail: str  # "success" or why not, in the words the exporter uses for the same failure
    seconds: float


def echo(
    destination: Destination, calling_ae: str, timeout_s: float = 10.0, ssl_context: ssl.SSLContext | None = None
) -> EchoResult:
    """One C-ECHO, set up exactly like a delivery (`send`): same TLS, same diagnosis of failures.

    The CLI and the console both echo through this (via `node.admin.ae.echo_ae`), so an echo that
    succeeds means the results can get through the same way. Never raises for network problems.
    """
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    watch = _AssociationWatch()
    start = time.perf_counter()
    status: int | None = None
    try:
        assoc = _open(destination, calling_ae, timeout_s, ssl_context, [build_context(Verification)], watch, "C-ECHO")
        if not assoc.is_established:
            if not watch.connected:
                raise _diagnose_connect(destination, ssl_context if destination.tls else None, timeout_s)
            raise watch.error(destination)
        try:
            rsp = assoc.send_c_echo()
            status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        finally:
            assoc.release()
    except SendError as e:
        return EchoResult(False, None, e.reason, time.perf_counter() - start)
    except (OSError, RuntimeError, ValueError) as e:
        return EchoResult(False, None, f"{type(e).__name__}: {e}", time.perf_counter() - start)
    elapsed = time.perf_counter() - start
    if status == 0x0000:
        return EchoResult(True, status, "success", elapsed)
    if status is None:
        return EchoResult(False, None, watch.reason() or "no C-ECHO response (DIMSE timeout or abort)", elapsed)
    return EchoResult(False, status, f"C-ECHO status 0x{status:04X}", elapsed)


def backoff_delay(attempt: int, cfg: SenderConfig | TriageConfig) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): initial * factor^(n-1), capped."""
    if attempt < 1:
        raise ValueError("attempts are numbered from 1")
    return float(min(cfg.backoff_max_s, cfg.backoff_initial_s * cfg.backoff_factor ** (attempt - 1)))


def client_ssl_context(
    ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """TLS client context: verify the destination against `ca_file` (system CAs if None), optional client cert."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
    if cert_file is not None:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    return context


def tls_client_context(tls: TLSConfig) -> ssl.SSLContext:
    """The node's one TLS client context for outgoing associations (deliveries, C-ECHO): `dicom.tls`'s
    CA verifies the peer, its certificate and key identify the node."""
    return client_ssl_context(tls.ca_file, tls.cert_file, tls.key_file)


# --- internals ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Loaded:
    dataset: Dataset
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: UID
    path: Path | None


def _load(item: Item) -> _Loaded | FileStatus:
    """The object to send, or a failed status for a file that cannot be (never retryable)."""
    path = None if isinstance(item, Dataset) else Path(item)
    try:
        ds = item if isinstance(item, Dataset) else pydicom.dcmread(Path(item))
        sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    except Exception as e:  # noqa: BLE001 — unreadable file or no UIDs: a disk or programming error, not the peer's
        return FileStatus("", "", None, f"{UNREADABLE}: {path or 'data set'}: {type(e).__name__}: {e}", path)
    meta = getattr(ds, "file_meta", None)
    syntax = (
        UID(str(meta.TransferSyntaxUID)) if meta is not None and "TransferSyntaxUID" in meta else ExplicitVRLittleEndian
    )
    return _Loaded(ds, sop_class, sop_instance, syntax, path)


def _contexts(items: Sequence[_Loaded]) -> list:  # type: ignore[type-arg]
    """One context per (SOP class, stored syntax); uncompressed objects also offer the other uncompressed
    syntaxes so a peer that only takes Implicit VR LE still gets them."""
    wanted: dict[tuple[str, tuple[str, ...]], None] = {}
    for item in items:
        syntaxes = (
            (item.transfer_syntax, *(s for s in UNCOMPRESSED if s != item.transfer_syntax))
            if item.transfer_syntax in UNCOMPRESSED
            else (item.transfer_syntax,)
        )
        wanted[(item.sop_class_uid, tuple(syntaxes))] = None
    return [build_context(sop_class, list(syntaxes)) for sop_class, syntaxes in wanted]


def _store(assoc: Association, item: _Loaded, watch: _AssociationWatch) -> FileStatus:
    def failed(error: str) -> FileStatus:
        return FileStatus(item.sop_instance_uid, item.sop_class_uid, None, error, item.path)

    if not assoc.is_established:
        return failed(watch.reason() or "association ended before this object was sent")
    usable = [
        cx
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == item.sop_class_uid
        and (
            cx.transfer_syntax[0] == item.transfer_syntax
            or (item.transfer_syntax in UNCOMPRESSED and cx.transfer_syntax[0] in UNCOMPRESSED)
        )
    ]
    if not usable:
        return _no_context(item)
    rsp = assoc.send_c_store(item.dataset)
    if "Status" not in rsp:
        return failed(watch.reason() or "no C-STORE response (association aborted or DIMSE timeout)")
    status = int(rsp.Status)
    error = None if (status == 0 or status >> 12 == 0xB) else _status_text(status, rsp)
    if error:
        log.warning("C-STORE of %s refused: %s", item.sop_instance_uid, error)
    return FileStatus(item.sop_instance_uid, item.sop_class_uid, status, error, item.path)


def _no_context(item: _Loaded) -> FileStatus:
    error = f"{NO_CONTEXT} for {UID(item.sop_class_uid).name} in {item.transfer_syntax.name}"
    return FileStatus(item.sop_instance_uid, item.sop_class_uid, None, error, item.path)


def _status_text(status: int | None, rsp: Dataset | None = None) -> str:
    if status is None:
        return "no response"
    comment = f" ({rsp.ErrorComment})" if rsp is not None and "ErrorComment" in rsp else ""
    return f"C-STORE status 0x{status:04X}{comment}"


def _diagnose_connect(destination: Destination, ssl_context: ssl.SSLContext | None, timeout_s: float) -> SendError:
    """Why the transport failed: refused, timed out, or the TLS handshake (e.g. certificate not trusted)."""
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    try:
        with socket.create_connection((destination.host, destination.port), timeout=timeout_s) as raw:
            if ssl_context is None:
                return SendError(f"cannot connect to {where}: connection closed before association")
            with ssl_context.wrap_socket(raw, server_hostname=destination.host):
                return SendError(f"cannot connect to {where}: TLS connection closed before association")
    except ssl.SSLCertVerificationError as e:
        return SendError(f"TLS handshake with {where} failed: {e.verify_message or e}", retryable=False)
    except ssl.SSLError as e:
        return SendError(f"TLS handshake with {where} failed: {e.reason or e}")
    except OSError as e:
        return SendError(f"cannot connect to {where} (destination down or unreachable): {e.strerror or e}")


class _AssociationWatch:
    """Remembers what the peer said (rejection reason, abort source), which pynetdicom only logs."""

    def __init__(self) -> None:
        self.connected = False
        self.rejection: tuple[int, str, str, str] | None = None  # result, result_str, source_str, reason_str
        self.aborted: str | None = None

    def handlers(self) -> list[Any]:  # pynetdicom's evt_handlers list
        return [(evt.EVT_CONN_OPEN, self._opened), (evt.EVT_ACSE_RECV, self._acse), (evt.EVT_ABORTED, self._abort)]

    def _opened(self, event: evt.Event) -> None:
        self.connected = True

    def _acse(self, event: evt.Event) -> None:
        primitive = event.primitive  # type: ignore[attr-defined]
        if isinstance(primitive, A_ASSOCIATE) and primitive.result in (0x01, 0x02):
            self.rejection = (int(primitive.result), primitive.result_str, primitive.source_str, primitive.reason_str)
        elif isinstance(primitive, A_ABORT | A_P_ABORT):
            source = getattr(primitive, "abort_source", None)
            self.aborted = f"association aborted by the {'peer' if source in (None, 0x00, 0x02) else 'provider'}"

    def _abort(self, event: evt.Event) -> None:
        self.aborted = self.aborted or "association aborted"

    def reason(self) -> str | None:
        return self.aborted

    def error(self, destination: Destination) -> SendError:
        where = f"{destination.ae_title}@{destination.host}:{destination.port}"
        if self.rejection is not None:
            result, result_str, source, reason = self.rejection
            # Permanent rejections (wrong called AE, calling AE not known) need a configuration change.
            return SendError(
                f"association rejected by {where}: {result_str} - {source}: {reason}", retryable=result == 0x02
            )
        if not self.connected:
            return SendError(f"cannot connect to {where} (destination down or unreachable)")
        return SendError(f"association with {where} failed: {self.aborted or 'no A-ASSOCIATE response'}")
