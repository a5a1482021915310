"""The DICOM front door: a pynetdicom Storage + Verification SCP with an association policy.

- Association policy (EVT_REQUESTED): the calling AE title must be in the AE table with role
  ``source`` or ``both`` (and, if the entry has a host and ``dicom.check_calling_host`` is on, the peer
  must connect from it); the called AE title must be ours. Otherwise A-ASSOCIATE-RJ
  (rejected-permanent, service-user, "calling/called AE title not recognised"). Every request is audited.
- Disk watermark: below ``storage.min_free_mb`` free, an association proposing storage is rejected
  (transient, audited) before any byte of a data set arrives; C-ECHO still works.
- C-STORE: pynetdicom writes the data set as it arrives into ``spool/.incoming`` (no decoding,
  ``STORE_RECV_CHUNKED_DATASET``), at most ``storage.max_instance_mb`` of it (:mod:`node.ingest.guard`);
  :class:`node.ingest.accept.Ingest` checks the header, makes the file durable, commits its row and only then
  is the status returned. A failure status carries the reason as Error Comment.
- Storage Commitment Push Model (:mod:`node.export.commitment`), both ways on this port: a sender's N-ACTION
  is answered from the audit log, and destinations send the N-EVENT-REPORTs for the node's own requests
  here (proposing the SCP role). A known AE of any role may open an association that proposes nothing
  but Storage Commitment and Verification: a destination-only PACS must be able to report.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from node.audit import AERole, AuditStore
from node.export import commitment
from node.ingest.accept import STATUS_PROCESSING_FAILURE, Ingest, StoreRequest
from node.ingest.guard import ConnectionGuard, GuardedRequestHandler, received_bytes
from node.runtime import metrics
from node.runtime.config import Settings, TLSConfig

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ: rejected-permanent (1), DUL service-user (1), diagnostics (PS3.8 9.3.4)
REJECT_PERMANENT, SOURCE_SERVICE_USER = 0x01, 0x01
# rejected-transient (2), service-provider presentation (3), temporary congestion (1): try again later
REJECT_TRANSIENT, SOURCE_PRESENTATION, TEMPORARY_CONGESTION = 0x02, 0x03, 0x01
VERIFICATION_UID = "1.2.840.10008.1.1"
#: What a known AE of any role (a destination reporting a commitment) may propose.
REPORT_ONLY_CONTEXTS = frozenset({VERIFICATION_UID, str(commitment.STORAGE_COMMITMENT)})
CALLING_AE_NOT_RECOGNISED, CALLED_AE_NOT_RECOGNISED = 0x03, 0x07

# Rejections pynetdicom makes by itself: (result source, diagnostic) -> what the audit log says.
_STACK_REJECTIONS: dict[tuple[object, object], str] = {
    (0x03, 0x02): "too many associations (dicom.max_associations reached)",
    (0x03, 0x01): "temporary congestion",
    (0x02, 0x02): "protocol version not supported",
    (0x01, 0x02): "application context name not supported",
}


@dataclass
class _AssociationState:
    """What the node tracks about one accepted association."""

    association_id: int
    calling_ae: str
    peer: str
    stored: int = 0
    duplicate: int = 0
    failed: int = 0


@functools.lru_cache(maxsize=256)
def _addresses(host: str) -> frozenset[str]:
    try:
        return frozenset(str(info[4][0]) for info in socket.getaddrinfo(host, None))
    except OSError:
        return frozenset({host})


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """TLS context for the listener (DICOM TLS profile: TLS 1.2+, optional client certificates)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    assert tls.cert_file is not None and tls.key_file is not None  # guaranteed by TLSConfig validation
    ctx.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return ctx


class StorageSCP:
    """The node's listening AE. ``start()`` returns the server; ``stop()`` stops accepting new associations."""

    def __init__(self, settings: Settings, store: AuditStore, ingest: Ingest) -> None:
        self.settings = settings
        self.store = store
        self.ingest = ingest
        self.commitment = commitment.CommitmentSCP(settings, store)
        self._states: dict[int, _AssociationState] = {}
        self._lock = threading.Lock()
        self.ae = self._make_ae()
        self.server: ThreadedAssociationServer | None = None

    def _make_ae(self) -> ApplicationEntity:
        d = self.settings.dicom
        ae = ApplicationEntity(ae_title=d.ae_title)
        ae.maximum_associations = d.max_associations
        ae.acse_timeout = d.acse_timeout
        ae.dimse_timeout = d.dimse_timeout
        ae.network_timeout = d.network_timeout
        ae.maximum_pdu_size = d.max_pdu
        # The called AE title is checked in the policy handler so that the rejection is audited.
        ae.require_called_aet = False
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        # Either role: senders ask the node to commit (node as SCP), destinations report on a new
        # association for what the node asked (they propose the SCP role, the node acts as SCU).
        ae.add_supported_context(commitment.STORAGE_COMMITMENT, scu_role=True, scp_role=True)
        return ae

    @property
    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ESTABLISHED, self.on_established),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_C_ECHO, self.on_c_echo),
            (evt.EVT_C_STORE, self.on_c_store),
            (evt.EVT_N_ACTION, self.on_n_action),
            (evt.EVT_N_EVENT_REPORT, self.on_n_event_report),
            (evt.EVT_DIMSE_SENT, self.commitment.on_dimse_sent),
        ]

    def start(
        self,
        server_class: type[ThreadedAssociationServer] = ThreadedAssociationServer,
        *,
        thread_name: str = "AcceptorServer",
    ) -> ThreadedAssociationServer:
        """Listen on ``dicom.host``:``dicom.port`` in a background thread; returns the server.

        `server_class` lets a listener process bind a socket of its own kind (``node.runtime.listeners`` uses a
        SO_REUSEPORT one); the handlers, TLS and chunked receiving are the same whatever the class.
        """
        d = self.settings.dicom
        # Received data sets go straight to a temp file in the spool (same filesystem: rename, no copy).
        _config.STORE_RECV_CHUNKED_DATASET = True
        tempfile.tempdir = str(self.ingest.spool.incoming)
        ctx = server_ssl_context(d.tls) if d.tls.enabled else None
        # AE.start_server(block=False) with our server class: it always makes its own class.
        server = self.ae.make_server(
            (d.host, d.port),
            evt_handlers=self.handlers,
            ssl_context=ctx,
            server_class=server_class,
            request_handler=GuardedRequestHandler,
        )
        guard = ConnectionGuard(self.settings, self.store)
        # The TLS handshake moves from pynetdicom's accept loop to each connection's thread (node.ingest.guard).
        guard.ssl_context, server.ssl_context = server.ssl_context, None
        server.guard = guard  # type: ignore[attr-defined]
        self.ae._servers.append(server)  # as start_server does: the AE tracks it, server.shutdown() removes it
        threading.Thread(target=server.serve_forever, name=thread_name, daemon=True).start()
        self.server = server
        log.info("listening as %s on %s:%d%s", d.ae_title, d.host, self.port, " (TLS)" if ctx else "")
        return server

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server else self.settings.dicom.port

    def stop(self) -> None:
        """Stop accepting associations; the ones in flight go on until they end."""
        if self.server is not None:
            self.server.shutdown()
            guard = getattr(self.server, "guard", None)
            if guard is not None:
                guard.close()
            self.server = None

    def active_associations(self) -> int:
        return len([a for a in self.ae.active_associations if a.is_acceptor])

    # -- association policy and bookkeeping -----------------------------------------------------------

    def policy_rejection(
        self, calling_ae: str, called_ae: str, peer_host: str, proposed: frozenset[str] = frozenset()
    ) -> tuple[int, str] | None:
        """(diagnostic, reason) when the association must be rejected, else None. `proposed`: the abstract
        syntaxes of the request (a known destination may open one for commitment reports only)."""
        d = self.settings.dicom
        reports_only = (
            bool(proposed) and proposed <= REPORT_ONLY_CONTEXTS and str(commitment.STORAGE_COMMITMENT) in proposed
        )
        # A PACS reports a commitment to the AE title that asked: sender.calling_ae when that is set.
        called_ok = ({d.ae_title, self.settings.sender.calling_ae} - {""}) if reports_only else {d.ae_title}
        if d.require_called_ae and called_ae.strip() not in called_ok:
            return CALLED_AE_NOT_RECOGNISED, f"called AE title not recognised: {called_ae.strip()!r}"
        if d.allow_unknown_calling_ae:
            return None
        entry = self.store.get_ae(calling_ae.strip())
        if entry is None or (entry.role not in (AERole.SOURCE, AERole.BOTH) and not reports_only):
            return CALLING_AE_NOT_RECOGNISED, f"calling AE title not recognised: {calling_ae.strip()!r}"
        if d.check_calling_host and entry.host and peer_host not in _addresses(entry.host):
            return (
                CALLING_AE_NOT_RECOGNISED,
                f"calling AE title {entry.name!r} not allowed from {peer_host} (expected {entry.host})",
            )
        return None

    def on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor
        # requestor.ae_title is only filled in during negotiation, which runs after this handler.
        prim = rq.primitive
        calling = (prim.calling_ae_title if prim is not None else "") or ""
        called = (prim.called_ae_title if prim is not None else "") or ""
        calling, called = calling.strip(), called.strip()
        peer_host, peer_port = rq.address, rq.port
        proposed = frozenset(
            str(cx.abstract_syntax) for cx in (prim.presentation_context_definition_list if prim is not None else [])
        )
        try:
            rejection = self.policy_rejection(calling, called, peer_host, proposed)
        except Exception:
            log.exception("association policy check failed; rejecting transiently")
            assoc.acse.send_reject(0x02, 0x01, 0x01)
            assoc.kill()
            return
        if rejection is None:
            self._reject_when_disk_low(assoc, calling, called, peer_host, peer_port)
            return
        diagnostic, reason = rejection
        metrics.count_association(
            "rejected",
            "called-ae-not-recognised" if diagnostic == CALLED_AE_NOT_RECOGNISED else "calling-ae-not-recognised",
        )
        self._reject(
            assoc, (calling, called, peer_host, peer_port), reason, (REJECT_PERMANENT, SOURCE_SERVICE_USER, diagnostic)
        )

    def _reject_when_disk_low(
        self, assoc: Association, calling: str, called: str, peer_host: str, peer_port: int | None
    ) -> None:
        """Below the watermark, refuse an association that may store before any data set arrives
        (transient: the peer retries later); verification-only associations still pass."""
        spool, min_free = self.ingest.spool, self.settings.storage.min_free_mb
        prim = assoc.requestor.primitive
        proposed = {str(cx.abstract_syntax) for cx in (prim.presentation_context_definition_list if prim else [])}
        if spool.has_room(min_free) or proposed <= REPORT_ONLY_CONTEXTS:
            return
        reason = f"free disk {spool.free_mb():.0f} MB below storage.min_free_mb {min_free}"
        metrics.count_association("rejected", "disk-low")
        self._reject(
            assoc,
            (calling, called, peer_host, peer_port),
            reason,
            (REJECT_TRANSIENT, SOURCE_PRESENTATION, TEMPORARY_CONGESTION),
        )

    def _reject(
        self, assoc: Association, peer: tuple[str, str, str, int | None], reason: str, rejection: tuple[int, int, int]
    ) -> None:
        """Send the A-ASSOCIATE-RJ (result, source, diagnostic), drop the connection, then audit the refused
        association with its reason.

        The answer goes first: a refused peer hands the node nothing to keep, so it need not wait for an
        audit database that is busy, and a failing audit write cannot leave the association to be
        negotiated (and accepted) as if no rejection had been decided.
        """
        calling, called, peer_host, peer_port = peer
        log.warning("rejecting association from %s@%s:%s: %s", calling, peer_host, peer_port, reason)
        assoc.acse.send_reject(*rejection)
        assoc.kill()  # returns once the A-ASSOCIATE-RJ is on the wire
        try:
            self.store.record_association(
                calling_ae=calling,
                called_ae=called,
                peer_host=peer_host,
                peer_port=peer_port,
                result="rejected",
                reason=reason,
                tls=self.settings.dicom.tls.enabled,
            )
        except Exception:
            log.exception("could not audit the rejected association from %s@%s", calling, peer_host)

    def on_established(self, event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor
        calling, peer = rq.ae_title.strip(), f"{rq.address}:{rq.port}"
        association_id = self.store.record_association(
            calling_ae=calling,
            called_ae=assoc.acceptor.ae_title.strip(),
            peer_host=rq.address,
            peer_port=rq.port,
            result="accepted",
            tls=self.settings.dicom.tls.enabled,
        )
        metrics.count_association("accepted")
        with self._lock:
            self._states[id(assoc)] = _AssociationState(association_id, calling, peer)
        log.info(
            "association %d from %s@%s accepted (%d contexts)",
            association_id,
            calling,
            peer,
            len(assoc.accepted_contexts),
        )

    def on_rejected(self, event: evt.Event) -> None:
        # Rejections decided by pynetdicom itself (e.g. maximum associations reached).
        assoc = event.assoc
        rq = assoc.requestor
        prim = assoc.acceptor.primitive
        source, diagnostic = getattr(prim, "result_source", None), getattr(prim, "diagnostic", None)
        reason = _STACK_REJECTIONS.get(
            (source, diagnostic), f"rejected by the DICOM stack (source {source}, diagnostic {diagnostic})"
        )
        metrics.count_association("rejected", "stack")
        log.warning("rejected association from %s@%s:%s: %s", rq.ae_title.strip(), rq.address, rq.port, reason)
        self.store.record_association(
            calling_ae=rq.ae_title.strip(),
            called_ae=self.settings.dicom.ae_title,
            peer_host=rq.address,
            peer_port=rq.port,
            result="rejected",
            reason=reason,
            tls=self.settings.dicom.tls.enabled,
        )

    def _end(self, assoc: Association, result: str) -> None:
        with self._lock:
            state = self._states.pop(id(assoc), None)
        if state is not None:
            self.store.end_association(
                state.association_id, result, stored=state.stored, duplicate=state.duplicate, failed=state.failed
            )
            log.info(
                "association %d %s: %d stored, %d duplicate, %d failed",
                state.association_id,
                result,
                state.stored,
                state.duplicate,
                state.failed,
            )

    def on_released(self, event: evt.Event) -> None:
        self._end(event.assoc, "released")

    def on_aborted(self, event: evt.Event) -> None:
        self._end(event.assoc, "aborted")

    # -- DIMSE ---------------------------------------------------------------------------------------

    def on_c_echo(self, event: evt.Event) -> int:
        return 0x0000

    def on_c_store(self, event: evt.Event) -> int | Dataset:
        with self._lock:
            state = self._states.get(id(event.assoc))
        req = cast(C_STORE, event.request)
        request = StoreRequest(
            affected_sop_class=str(req.AffectedSOPClassUID or ""),
            affected_sop_instance=str(req.AffectedSOPInstanceUID or ""),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            calling_ae=state.calling_ae if state else event.assoc.requestor.ae_title.strip(),
            priority=int(req.Priority or 0),
            association_id=state.association_id if state else None,
            peer=state.peer if state else "",
            received_bytes=received_bytes(req),
        )
        try:
            received = Path(event.dataset_path)
        except AttributeError:  # only if chunked receiving were switched off: a bug, not the peer's fault
            log.exception("C-STORE data set was not written to a file")
            return STATUS_PROCESSING_FAILURE
        with contextlib.suppress(OSError):  # ingest reports a missing file
            metrics.count_received_bytes(received.stat().st_size)  # before ingest moves the file
        started = time.perf_counter()
        outcome = self.ingest.receive(received, request)
        metrics.observe_stage("persist", time.perf_counter() - started)
        metrics.count_store_status(outcome.status)
        if state is not None:
            if outcome.kind == "stored":
                state.stored += 1
            elif outcome.kind == "duplicate":
                state.duplicate += 1
            else:
                state.failed += 1
        if outcome.kind == "error":  # the node's own fault: its details stay in the node's log
            return _status_dataset(outcome.status, "internal error of the receiving node")
        failed = outcome.kind in ("rejected", "refused")
        return _status_dataset(outcome.status, outcome.reason) if failed or outcome.warned else outcome.status

    def on_n_action(self, event: evt.Event) -> tuple[int | Dataset, None]:
        """A sender asks the node to commit instances it sent (node.export.commitment answers)."""
        with self._lock:
            state = self._states.get(id(event.assoc))
        return self.commitment.on_n_action(event, state.association_id if state else None)

    def on_n_event_report(self, event: evt.Event) -> tuple[int | Dataset, None]:
        """A destination reports on a commitment the node asked for, on a new association."""
        return commitment.handle_report_event(self.store, self.settings.sender, event, via="new association")


def _status_dataset(status: int, reason: str) -> Dataset:
    """A failure or warning status with the reason as Error Comment (LO: 64 characters, no backslash)."""
    rsp = Dataset()
    rsp.Status = status
    comment = "".join(c if c.isprintable() and c != "\\" else " " for c in reason)[:64].strip()
    if comment:
        rsp.ErrorComment = comment
    return rsp
