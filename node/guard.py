"""Defences of the DICOM listener against peers that would exhaust it (issue 13).

pynetdicom trusts its peer: it writes a C-STORE data set to disk however long it is, buffers a PDU of
whatever length the peer declares, and keeps a half-open connection for as long as the peer drips
bytes. A node in front of PACS must go on receiving from every legitimate modality whatever one bad
peer sends, so the listener's connections are made here, with bounds pynetdicom lacks:

- the bytes of one C-STORE data set kept on disk are capped (``storage.max_instance_mb``): beyond the
  cap the file is emptied and the rest of the data set is read and dropped, so the peer still gets a
  C-STORE failure status for it (see :class:`SizeCappedDIMSE`);
- a PDU is read only when its declared length fits: ``dicom.max_request_pdu`` before the association
  is accepted (an A-ASSOCIATE-RQ is a few kB), the maximum the node negotiated (``dicom.max_pdu``)
  after. A longer one is never buffered: the peer gets an A-ABORT and the connection is dropped
  (see :class:`GuardedSocket`).

Each drop is logged and audited as ``connection.dropped`` with the peer address; per peer address at
most :data:`AUDIT_BURST` such rows a minute are written (then one row says how many were left out), so
a flood of bad connections cannot fill the audit log instead.

One :class:`GuardedRequestHandler` per connection is what the SCP's server class instantiates
(``request_handler=``); everything else stays pynetdicom's. The bounds live in one
:class:`ConnectionGuard` per listener (``server.guard``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import IO, Any, cast

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

from node.audit import AuditStore
from node.config import Settings

log = logging.getLogger(__name__)

AUDIT_BURST = 10  # connection.dropped rows per peer address and minute
AUDIT_WINDOW_S = 60.0
MIB = 1024 * 1024


class ConnectionGuard:
    """The listener's bounds on its peers, and the one place that logs and audits a dropped connection."""

    def __init__(self, settings: Settings, store: AuditStore) -> None:
        d = settings.dicom
        self.store = store
        self.max_instance_bytes = settings.storage.max_instance_mb * MIB
        self.max_request_pdu = d.max_request_pdu
        self.max_pdu = d.max_pdu  # 0: no limit once associated (what the node offered the peer)
        self._lock = threading.Lock()
        self._audit_windows: dict[str, tuple[float, int, int]] = {}  # peer -> (window start, written, left out)

    def pdu_limit(self, assoc: Any) -> int | None:
        """The longest PDU (its length field) the node reads now on `assoc`; None: no limit."""
        if assoc.is_established:
            return int(assoc.acceptor.maximum_length or 0) or None
        return self.max_request_pdu

    def dropped(self, assoc: Any, reason: str, **detail: Any) -> None:
        """Log and audit (throttled per peer address) a connection the guard ends."""
        host, port = _peer(assoc)
        calling = _calling_ae(assoc)
        now = time.monotonic()
        with self._lock:
            start, written, left_out = self._audit_windows.get(host, (now, 0, 0))
            if now - start > AUDIT_WINDOW_S:
                start, written, left_out = now, 0, left_out
            record = written < AUDIT_BURST
            self._audit_windows[host] = (start, written + record, 0 if record else left_out + 1)
        if not record:
            return
        log.warning("dropped connection from %s@%s:%s: %s", calling or "?", host, port, reason)
        try:
            self.store.add_event("connection.dropped", detail={
                "peer": f"{host}:{port}", "calling_ae": calling, "reason": reason,
                "associated": bool(assoc.is_established), **detail,
                **({"left_out_before": left_out} if left_out else {})})
        except Exception:
            log.exception("could not audit the dropped connection from %s", host)


def _peer(assoc: Any) -> tuple[str, int | None]:
    info = getattr(assoc.requestor, "address_info", None)
    return (str(info.address), int(info.port)) if info is not None else ("?", None)


def _calling_ae(assoc: Any) -> str:
    prim = assoc.requestor.primitive
    return str((prim.calling_ae_title if prim is not None else "") or "").strip()


class GuardedSocket(AssociationSocket):
    """pynetdicom's connection socket that refuses to read a PDU longer than the guard allows, and that
    the guard can drop.

    The DUL reads a PDU as ``recv(6)`` (type and length) then ``recv(length)``: the second call is where
    a declared length is known and nothing of the body has been read yet.
    """

    guard: ConnectionGuard
    dropped = False

    def recv(self, nr_bytes: int) -> bytearray:
        if self.dropped:
            return bytearray()
        limit = self.guard.pdu_limit(self.assoc)
        if limit is not None and nr_bytes > limit:
            when = "after the association was accepted" if self.assoc.is_established else "before association"
            self.drop(f"PDU of {nr_bytes} bytes declared, more than {limit} allowed {when}",
                      pdu_length=nr_bytes, limit=limit)
            return bytearray()  # the DUL sees a short PDU: transport closed (Evt17), the association ends
        return super().recv(nr_bytes)

    @property
    def ready(self) -> bool:
        """No more reading once dropped: what the peer still sends is never looked at."""
        return False if self.dropped else bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]

    def drop(self, reason: str, **detail: Any) -> None:
        """Audit, A-ABORT (service-provider, invalid PDU parameter value) and shut the connection down.

        The DUL then ends the association as if the peer had closed it (an accepted one is audited as
        aborted); a connection not yet associated is ended at once instead of after ``acse_timeout``.
        """
        with _DROP_LOCK:
            if self.dropped:
                return
            self.dropped = True
        self.guard.dropped(self.assoc, reason, **detail)
        sock = self.socket
        if sock is not None:
            abort = A_ABORT_RQ()
            abort.source, abort.reason_diagnostic = 0x02, 0x06
            try:
                sock.settimeout(1.0)
                sock.sendall(abort.encode())
            except OSError:
                pass
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if not self.assoc.is_established:
            # The association thread waits acse_timeout for an A-ASSOCIATE-RQ: nothing is an answer now.
            self.assoc.dul.to_user_queue.put(None)


_DROP_LOCK = threading.Lock()


class CappedFile:
    """Stands in for the temporary file pynetdicom writes a received data set to: counts every byte,
    keeps at most `limit`; past it the file is emptied and the rest dropped (`exceeded`)."""

    def __init__(self, f: IO[bytes], limit: int) -> None:
        self._f = f
        self.limit = limit
        self.received = f.tell()
        self.exceeded = False

    def write(self, data: bytes) -> int:
        self.received += len(data)
        if self.exceeded:
            return len(data)
        if self.received > self.limit:
            self.exceeded = True
            self._f.seek(0)
            self._f.truncate()
            log.warning("data set in %s passed %d bytes: emptied, the rest is dropped", self._f.name, self.limit)
            return len(data)
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:  # name, file, close … of the NamedTemporaryFile
        return getattr(self._f, name)


def received_bytes(request: object) -> int | None:
    """Bytes the peer sent for a C-STORE data set (kept or not), when it was received under the cap."""
    f = getattr(request, "_dataset_file", None)
    return f.received if isinstance(f, CappedFile) else None


class SizeCappedDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with the data set file of an incoming C-STORE wrapped in a
    :class:`CappedFile`, as soon as the message that creates it has been decoded."""

    def __init__(self, assoc: Any, max_bytes: int) -> None:
        super().__init__(assoc)
        self.max_bytes = max_bytes

    def receive_primitive(self, primitive: P_DATA) -> None:
        self._cap()
        super().receive_primitive(primitive)
        self._cap()  # the message's file was created in this call: one PDU (<= max_pdu) at most was written

    def _cap(self) -> None:
        message = self.message
        f = getattr(message, "_data_set_file", None) if message is not None else None
        if f is not None and not isinstance(f, CappedFile):
            capped = CappedFile(f, self.max_bytes)
            if capped.received > self.max_bytes:
                capped.write(b"")
            message._data_set_file = capped  # type: ignore[union-attr]


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's connection handler with the node's bounds installed on each new association."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        guard: ConnectionGuard | None = getattr(self.server, "guard", None)
        if guard is None:
            return assoc
        assoc.dimse = SizeCappedDIMSE(assoc, guard.max_instance_bytes)
        # The socket pynetdicom just made gets the guarded class (same state; only recv differs): making a
        # second one would announce the connection to the state machine twice.
        sock = assoc.dul.socket
        assert sock is not None  # set by _create_association
        sock.__class__ = GuardedSocket
        cast(GuardedSocket, sock).guard = guard
        return assoc
