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

- a connection must complete its A-ASSOCIATE-RQ within ``dicom.association_request_timeout_s`` of
  connecting, however slowly it drips bytes; at most ``dicom.max_pending_associations`` connections may
  be waiting for theirs, and at most ``dicom.max_connections_per_peer`` connections come from one
  address. When a new connection would pass a limit, the oldest connection still not associated is
  dropped to make room (a real modality sends its request within milliseconds, so slow peers lose to
  fast ones); only when a peer address holds its whole share in accepted associations is the new
  connection refused (see :meth:`ConnectionGuard.admit`);
- with TLS, the handshake runs on the connection's thread under the same deadline, not in the accept
  loop where pynetdicom does it (one silent TLS client would stop every other connection);
- behind a load balancer that sends the PROXY protocol v2 header (``dicom.proxy_protocol_from``), the
  sender's address comes from the header, read under the same deadline before TLS, so the bounds
  above, the calling-host check and the audit log see the modality, not the balancer.

Each drop is logged and audited as ``connection.dropped`` with the peer address; per peer address at
most :data:`AUDIT_BURST` such rows a minute are written (then one row says how many were left out), so
a flood of bad connections cannot fill the audit log instead. The connection is cut before its row is
written: an audit database that is busy (SQLite waits up to its busy timeout for another writer) must
not keep a hostile peer's connection open, nor hold the watchdog back from the next late connection.

One :class:`GuardedRequestHandler` per connection is what the SCP's server class instantiates
(``request_handler=``); everything else stays pynetdicom's. The bounds live in one
:class:`ConnectionGuard` per listener (``server.guard``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import IO, Any, cast

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

from node.audit import AuditStore
from node.runtime.config import Settings

log = logging.getLogger(__name__)

#: The 12 bytes a PROXY protocol v2 header starts with (haproxy.org/download/2.6/doc/proxy-protocol.txt).
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V2_MAX_BODY = 1024  # addresses (36 bytes at most) and a few TLVs
AUDIT_BURST = 10  # connection.dropped rows per peer address and minute
AUDIT_WINDOW_S = 60.0
MIB = 1024 * 1024


class ConnectionGuard:
    """The listener's bounds on its peers, and the one place that logs and audits a dropped connection."""

    def __init__(self, settings: Settings, store: AuditStore, *, tick_s: float = 0.25) -> None:
        d = settings.dicom
        self.store = store
        self.max_instance_bytes = settings.storage.max_instance_mb * MIB
        self.max_request_pdu = d.max_request_pdu
        self.request_timeout_s = d.association_request_timeout_s
        self.max_pending = d.max_pending_associations
        self.max_per_peer = d.max_connections_per_peer
        self.proxies = frozenset(d.proxy_protocol_from)
        self.ssl_context: ssl.SSLContext | None = None  # set by the SCP: the handshake happens in `handshake`
        self._lock = threading.Lock()
        self._audit_windows: dict[str, tuple[float, int, int]] = {}  # peer -> (window start, written, left out)
        self._conns: list[_Connection] = []
        self._tick_s = tick_s
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    # -- connections ----------------------------------------------------------------------------------

    def admit(self, assoc: Any) -> None:
        """Register a new connection; drop what must go to make room for it (maybe the new one)."""
        sock = cast(GuardedSocket, assoc.dul.socket)
        new = _Connection(assoc, sock, _peer(assoc)[0], time.monotonic())
        drops: list[tuple[_Connection, str]] = []
        with self._lock:
            self._start_watchdog()
            live = [c for c in self._conns if c.alive]
            mine = [c for c in live if c.host == new.host]
            refuse_new = False
            if len(mine) >= self.max_per_peer:
                waiting = [c for c in mine if c.pending]
                if waiting:
                    drops.append(
                        (
                            waiting[0],
                            f"{len(mine) + 1} connections from {new.host}, more than "
                            f"dicom.max_connections_per_peer {self.max_per_peer}: its oldest "
                            "connection not yet associated is dropped",
                        )
                    )
                else:
                    refuse_new = True
                    drops.append(
                        (
                            new,
                            f"{new.host} holds dicom.max_connections_per_peer {self.max_per_peer} associations already",
                        )
                    )
            if not refuse_new:
                pending = [c for c in live if c.pending and all(c is not d for d, _ in drops)]
                if len(pending) >= self.max_pending:
                    drops.append(
                        (
                            pending[0],
                            f"{len(pending) + 1} connections waiting for association, more "
                            f"than dicom.max_pending_associations {self.max_pending}: the "
                            "oldest is dropped",
                        )
                    )
                live.append(new)
            self._conns = live
        self._drop_all(drops)

    def handshake(self, raw: socket.socket) -> socket.socket:
        """TLS: the server-side handshake, within the association request deadline; OSError when it fails."""
        assert self.ssl_context is not None
        raw.settimeout(self.request_timeout_s)
        tls = self.ssl_context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        tls.do_handshake()
        tls.settimeout(None)
        return tls

    def proxied_address(self, raw: socket.socket) -> tuple[str, int] | None:
        """The sender's address from the balancer's PROXY v2 header (:func:`read_proxy_v2`)."""
        return read_proxy_v2(raw, self.request_timeout_s)

    def refused_proxy(self, host: str, port: int, error: BaseException) -> None:
        """A connection from a balancer without a valid PROXY header: logged and audited as dropped."""
        self._audit(host, port, "", f"PROXY protocol: {type(error).__name__}: {error}", associated=False)

    def close(self) -> None:
        self._stop.set()

    def _start_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, name="connection-guard", daemon=True)
            self._watchdog.start()

    def _watch(self) -> None:
        """Drop every connection whose association request is not complete by its deadline."""
        while not self._stop.wait(self._tick_s):
            now = time.monotonic()
            with self._lock:
                self._conns = [c for c in self._conns if c.alive]
                late = [c for c in self._conns if c.pending and now - c.since > self.request_timeout_s]
            self._drop_all(
                [
                    (
                        conn,
                        f"association request not complete {now - conn.since:.1f} s after connecting "
                        f"(dicom.association_request_timeout_s {self.request_timeout_s:g})",
                    )
                    for conn in late
                ]
            )

    def _drop_all(self, drops: list[tuple[_Connection, str]]) -> None:
        """Cut every connection first, then audit them: no peer waits for another one's audit row."""
        cut = [(conn, reason, conn.sock.cut()) for conn, reason in drops]
        for conn, reason, associated in cut:
            if associated is not None:
                self.dropped(conn.assoc, reason, associated=associated)

    def refused_handshake(self, host: str, port: int, error: BaseException) -> None:
        """A TLS handshake that failed or took too long: logged and audited like a dropped connection."""
        self._audit(host, port, "", f"TLS handshake failed: {type(error).__name__}: {error}", associated=False)

    # -- audit ----------------------------------------------------------------------------------------

    def pdu_limit(self, assoc: Any) -> int | None:
        """The longest PDU (its length field) the node reads now on `assoc`; None: no limit."""
        if assoc.is_established:
            return int(assoc.acceptor.maximum_length or 0) or None
        return self.max_request_pdu

    def dropped(self, assoc: Any, reason: str, *, associated: bool, **detail: Any) -> None:
        """Log and audit (throttled per peer address) a connection the guard has cut; `associated`: whether
        its association was established when it was cut (by now the DUL may have ended it)."""
        host, port = _peer(assoc)
        self._audit(host, port, _calling_ae(assoc), reason, associated=associated, **detail)

    def _audit(self, host: str, port: int | None, calling: str, reason: str, **detail: Any) -> None:
        now = time.monotonic()
        with self._lock:
            start, written, left_out = self._audit_windows.get(host, (now, 0, 0))
            if now - start > AUDIT_WINDOW_S:
                start, written, left_out = now, 0, left_out
            record = written < AUDIT_BURST
            self._audit_windows[host] = (start, written + record, 0 if record else left_out + 1)
        if not record:
            return
        log.warning("dropped connection from %s%s:%s: %s", f"{calling}@" if calling else "", host, port, reason)
        try:
            self.store.add_event(
                "connection.dropped",
                detail={
                    "peer": f"{host}:{port}",
                    "calling_ae": calling,
                    "reason": reason,
                    **detail,
                    **({"left_out_before": left_out} if left_out else {}),
                },
            )
        except Exception:
            log.exception("could not audit the dropped connection from %s", host)


@dataclass(eq=False)
class _Connection:
    assoc: Any
    sock: GuardedSocket
    host: str
    since: float  # time.monotonic() at connect

    @property
    def alive(self) -> bool:
        return not self.sock.dropped and (self.assoc.ident is None or self.assoc.is_alive())

    @property
    def pending(self) -> bool:
        """Its A-ASSOCIATE-RQ has not been received whole yet."""
        return self.assoc.requestor.primitive is None


def read_proxy_v2(raw: socket.socket, timeout_s: float) -> tuple[str, int] | None:
    """The sender's (address, port) from the PROXY v2 header a balancer starts `raw` with, read within
    `timeout_s` (the association request deadline); None for the balancer's own connections (a health
    check's LOCAL command, or a connection closed before any byte). ValueError for a malformed header,
    OSError when the connection ends or stalls inside the header."""
    raw.settimeout(timeout_s)
    try:
        head = _recv_exact(raw, 16, eof_ok=True)
        if head is None:
            return None
        if head[:12] != PROXY_V2_SIGNATURE or head[12] >> 4 != 2:
            raise ValueError("the connection does not start with a PROXY protocol v2 header")
        (length,) = struct.unpack("!H", head[14:16])
        if length > PROXY_V2_MAX_BODY:
            raise ValueError(f"PROXY v2 header of {length} bytes, more than {PROXY_V2_MAX_BODY}")
        body = _recv_exact(raw, length) or b""
    finally:
        raw.settimeout(None)
    command, family = head[12] & 0x0F, head[13] >> 4
    if command == 0:  # LOCAL: the balancer's own connection (health check)
        return None
    if family == 1 and len(body) >= 12:
        return socket.inet_ntop(socket.AF_INET, body[0:4]), struct.unpack("!H", body[8:10])[0]
    if family == 2 and len(body) >= 36:
        return socket.inet_ntop(socket.AF_INET6, body[0:16]), struct.unpack("!H", body[32:34])[0]
    raise ValueError(f"PROXY v2 header with an address family the node does not take ({family})")


def _recv_exact(raw: socket.socket, n: int, *, eof_ok: bool = False) -> bytes | None:
    """Exactly `n` bytes; None when the peer closes before the first one and `eof_ok`; else OSError."""
    data = b""
    while len(data) < n:
        chunk = raw.recv(n - len(data))
        if not chunk:
            if eof_ok and not data:
                return None
            raise ConnectionError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


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
    _eof_given = False  # the DUL was told the connection ended (a short read): it reads no more

    def recv(self, nr_bytes: int) -> bytearray:
        if self.dropped:
            self._eof_given = True
            return bytearray()
        limit = self.guard.pdu_limit(self.assoc)
        if limit is not None and nr_bytes > limit:
            when = "after the association was accepted" if self.assoc.is_established else "before association"
            self.drop(
                f"PDU of {nr_bytes} bytes declared, more than {limit} allowed {when}", pdu_length=nr_bytes, limit=limit
            )
            self._eof_given = True
            return bytearray()  # the DUL sees a short PDU: transport closed (Evt17), the association ends
        data = super().recv(nr_bytes)
        if len(data) < nr_bytes:
            self._eof_given = True  # closed by the peer, or shut down by `drop` while the DUL waited
        return data

    @property
    def ready(self) -> bool:
        """Once dropped, "ready" once so that the DUL reads the end of the connection (one short read: one
        transport-closed event, in whatever state it is); then never again: what the peer still sends
        is never looked at."""
        if self._eof_given:
            return False
        return True if self.dropped else bool(AssociationSocket.ready.fget(self))  # type: ignore[attr-defined]

    def drop(self, reason: str, **detail: Any) -> None:
        """Cut the connection (:meth:`cut`), then audit why."""
        associated = self.cut()
        if associated is not None:
            self.guard.dropped(self.assoc, reason, associated=associated, **detail)

    def cut(self) -> bool | None:
        """A-ABORT (service-provider, invalid PDU parameter value) and shut the connection down; whether its
        association was established then, or None when it had been cut already.

        The DUL then ends the association as if the peer had closed it (an accepted one is audited as
        aborted); a connection not yet associated is ended at once instead of after ``acse_timeout``.
        """
        with _DROP_LOCK:
            if self.dropped:
                return None
            self.dropped = True
        associated = bool(self.assoc.is_established)
        sock = self.socket
        if sock is not None:
            # An SSL object must not be written by one thread while another reads it: from the watchdog,
            # a TLS connection is only shut down (the DUL thread may be blocked reading it).
            if threading.current_thread() is self.assoc.dul or not isinstance(sock, ssl.SSLSocket):
                abort = A_ABORT_RQ()
                abort.source, abort.reason_diagnostic = 0x02, 0x06
                try:
                    sock.settimeout(1.0)
                    sock.sendall(abort.encode())
                except OSError:
                    pass
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if not associated:
            # The association thread waits acse_timeout for an A-ASSOCIATE-RQ: nothing is an answer now.
            self.assoc.dul.to_user_queue.put(None)
        return associated


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

    def setup(self) -> None:
        """TLS handshake here, on this connection's thread, under the request deadline (see the module)."""
        super().setup()
        guard: ConnectionGuard | None = getattr(self.server, "guard", None)
        self.refused = False
        if guard is not None and self.client_address[0] in guard.proxies:
            host, port = self.client_address[0], int(self.client_address[1])
            try:
                sender = guard.proxied_address(cast(socket.socket, self.request))
            except (OSError, ValueError) as e:
                guard.refused_proxy(str(host), port, e)
                self.refused = True
                return
            if sender is None:  # the balancer's health check: nothing to serve, nothing to audit
                self.refused = True
                return
            self.client_address = sender
        if guard is not None and guard.ssl_context is not None:
            host, port = self.client_address[0], int(self.client_address[1])
            try:
                self.request = guard.handshake(cast(socket.socket, self.request))
            except (OSError, ValueError) as e:
                guard.refused_handshake(str(host), port, e)
                self.refused = True

    def handle(self) -> None:
        """As pynetdicom's, with the connection admitted by the guard before the association starts."""
        guard: ConnectionGuard | None = getattr(self.server, "guard", None)
        if guard is None:
            super().handle()
            return
        if self.refused:
            self.server.shutdown_request(self.request)
            return
        assoc = self._create_association()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        guard.admit(assoc)
        assoc.start()

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
