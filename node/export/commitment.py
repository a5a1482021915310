"""Storage Commitment Push Model (PS3.4 Annex J), both roles.

Delivering a result is not the same as the destination keeping it: a PACS may accept a C-STORE into
a cache it later loses. A destination with ``storage_commitment`` on (a per-AE setting) is asked, after
each batch it stored, to take responsibility for those instances:

- **SCU** (:func:`request_commitment`, driven by :mod:`node.export.exporter`): the exports become
  ``committing`` and the transaction (its UID and the instances) is written to the audit DB *before*
  the N-ACTION goes out. The N-EVENT-REPORT may come on the same association (the exporter keeps it
  open for ``sender.commitment_wait_s``) or later on a new association to the node's SCP (the peer
  proposes the SCP role for this SOP class; :class:`CommitmentSCP` accepts it). Either way
  :func:`record_report` settles the exports (``committed``, or sent again with the exporter's backoff,
  then dead). No report by ``sender.commitment_timeout_s`` counts as a failed send: the expiry is a
  DB deadline, so a node killed between send and report sends again once after its restart.
- **SCP** (:class:`CommitmentSCP`): a sender asks the node to commit what it sent; the answer comes
  from the audit log and the spool (success only for instances stored, recorded and still on disk;
  0x0112 No such object instance or 0x0119 Class/instance conflict otherwise). The report goes on the
  requester's association when it is still open, else on a new association to the requester's AE,
  which must be in the AE table with host and port.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID
from pynetdicom import AE, build_context, build_role, evt
from pynetdicom.association import Association

from node.audit import AuditStore, Instance
from node.audit.export_store import RetryAt
from node.audit.models import utcnow
from node.export.sender import (
    Destination,
    SendError,
    _AssociationWatch,
    _diagnose_connect,
    _open,
    backoff_delay,
    tls_client_context,
)
from node.runtime import metrics
from node.runtime.config import SenderConfig, Settings

log = logging.getLogger(__name__)

STORAGE_COMMITMENT = UID("1.2.840.10008.1.20.1")  # Storage Commitment Push Model SOP Class
STORAGE_COMMITMENT_INSTANCE = UID("1.2.840.10008.1.20.1.1")  # its well-known SOP Instance
ACTION_REQUEST_COMMITMENT = 1  # N-ACTION Action Type ID
EVENT_ALL_COMMITTED, EVENT_SOME_FAILED = 1, 2  # N-EVENT-REPORT Event Type IDs

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
NO_SUCH_EVENT_TYPE = 0x0113
INVALID_ARGUMENT_VALUE = 0x0115
CLASS_INSTANCE_CONFLICT = 0x0119
NO_SUCH_ACTION_TYPE = 0x0123

#: A report the requester's association cannot carry goes on a new one, tried again after these pauses.
REPORT_RETRY_DELAYS_S = (1.0, 5.0)
NOT_REACHABLE = "requester has no address"

#: Failure Reason (0008,1197) values a report may carry (PS3.3 C.14.1.1), in words for the audit log.
FAILURE_REASONS = {
    PROCESSING_FAILURE: "processing failure",
    NO_SUCH_OBJECT_INSTANCE: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP class not supported",
    CLASS_INSTANCE_CONFLICT: "class/instance conflict",
    0x0131: "duplicate transaction UID",
}


def failure_text(reason: int | None) -> str:
    if reason is None:
        return "failed (no Failure Reason)"
    return f"0x{reason:04X} {FAILURE_REASONS.get(reason, 'failure')}"


@dataclass(frozen=True)
class Reference:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Report:
    """What an N-EVENT-REPORT of a commitment says: which instances are committed, which failed and why."""

    transaction_uid: str
    committed: list[Reference] = field(default_factory=list)
    failed: list[tuple[Reference, int]] = field(default_factory=list)

    @property
    def event_type(self) -> int:
        return EVENT_SOME_FAILED if self.failed else EVENT_ALL_COMMITTED

    def to_dataset(self) -> Dataset:
        ds = Dataset()
        ds.TransactionUID = self.transaction_uid
        if self.committed:
            ds.ReferencedSOPSequence = DicomSequence([_ref_item(r) for r in self.committed])
        if self.failed:
            items = []
            for ref, reason in self.failed:
                item = _ref_item(ref)
                item.FailureReason = reason
                items.append(item)
            ds.FailedSOPSequence = DicomSequence(items)
        return ds

    @classmethod
    def from_dataset(cls, ds: Dataset) -> Report:
        """Raises ValueError when the report has no Transaction UID or an item without its UIDs."""
        tx = str(ds.get("TransactionUID", "") or "")
        if not tx:
            raise ValueError("no Transaction UID")
        committed = [_ref(item) for item in ds.get("ReferencedSOPSequence", [])]
        failed = [
            (_ref(item), int(item.get("FailureReason", PROCESSING_FAILURE))) for item in ds.get("FailedSOPSequence", [])
        ]
        return cls(tx, committed, failed)


def request_dataset(transaction_uid: str, references: Sequence[Reference]) -> Dataset:
    """The N-ACTION Action Information: Transaction UID and the instances to commit."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.ReferencedSOPSequence = DicomSequence([_ref_item(r) for r in references])
    return ds


def parse_request(ds: Dataset) -> tuple[str, list[Reference]]:
    """(transaction UID, references) of an N-ACTION; ValueError with the reason when it is malformed."""
    tx = str(ds.get("TransactionUID", "") or "")
    if not tx:
        raise ValueError("no Transaction UID (0008,1195)")
    items = ds.get("ReferencedSOPSequence")
    if not items:
        raise ValueError("no Referenced SOP Sequence (0008,1199)")
    return tx, [_ref(item) for item in items]


def _ref_item(ref: Reference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    return item


def _ref(item: Dataset) -> Reference:
    cls, inst = str(item.get("ReferencedSOPClassUID", "") or ""), str(item.get("ReferencedSOPInstanceUID", "") or "")
    if not cls or not inst:
        raise ValueError("a Referenced SOP item lacks its SOP Class or SOP Instance UID")
    return Reference(cls, inst)


def _status_dataset(status: int, comment: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = "".join(c if c.isprintable() and c != "\\" else " " for c in comment)[:64].strip()
    return rsp


# --- SCU: the node asks a destination to commit ------------------------------------------------------


def retry_at(cfg: SenderConfig) -> RetryAt:
    """The exporter's retry policy for a send that was not committed: backoff, dead after max_attempts."""

    def when(attempts: int) -> datetime | None:
        if attempts >= cfg.max_attempts:
            return None
        return utcnow() + timedelta(seconds=backoff_delay(max(1, attempts), cfg))

    return when


def record_report(
    store: AuditStore,
    cfg: SenderConfig,
    report: Report,
    *,
    via: str,
    on_settled: Callable[[Instance], None] | None = None,
) -> bool:
    """Record an N-EVENT-REPORT for a commitment the node asked for; False when it was unknown or late."""
    failed = {ref.sop_instance_uid: failure_text(reason) for ref, reason in report.failed}
    row = store.record_commitment_report(
        report.transaction_uid,
        committed=[r.sop_instance_uid for r in report.committed],
        failed=failed,
        via=via,
        retry_at=retry_at(cfg),
        on_settled=on_settled,
    )
    if row is None:
        metrics.count_commitment("scu", "unknown")
        log.warning("N-EVENT-REPORT (%s) for transaction %s that is not pending: ignored", via, report.transaction_uid)
        return False
    metrics.count_commitment("scu", str(row.state))
    log.info(
        "storage commitment %s from %s (%s): %d committed, %d failed",
        report.transaction_uid,
        row.destination_ae,
        via,
        len(report.committed),
        len(report.failed),
    )
    return True


def handle_report_event(
    store: AuditStore,
    cfg: SenderConfig,
    event: evt.Event,
    *,
    via: str,
    on_settled: Callable[[Instance], None] | None = None,
) -> tuple[int | Dataset, None]:
    """EVT_N_EVENT_REPORT handler (same association or the node's SCP): never raises to pynetdicom."""
    req = event.request
    if str(getattr(req, "AffectedSOPClassUID", "")) != STORAGE_COMMITMENT:
        return _status_dataset(PROCESSING_FAILURE, "only Storage Commitment reports are accepted"), None
    if event.event_type not in (EVENT_ALL_COMMITTED, EVENT_SOME_FAILED):
        return NO_SUCH_EVENT_TYPE, None
    try:
        report = Report.from_dataset(event.event_information)
    except Exception as e:  # noqa: BLE001 — undecodable or incomplete: say why, keep the node running
        store.add_event("commitment.bad_report", detail={"via": via, "error": f"{type(e).__name__}: {e}"})
        return _status_dataset(INVALID_ARGUMENT_VALUE, f"invalid report: {e}"), None
    try:
        record_report(store, cfg, report, via=via, on_settled=on_settled)
    except Exception:
        log.exception("recording the storage commitment report %s failed", report.transaction_uid)
        return PROCESSING_FAILURE, None  # the peer may send it again
    return SUCCESS, None


@dataclass(frozen=True)
class ActionResult:
    ok: bool
    status: int | None
    error: str = ""


def request_commitment(
    destination: Destination,
    transaction_uid: str,
    references: Sequence[Reference],
    *,
    calling_ae: str,
    cfg: SenderConfig,
    on_report: Callable[[evt.Event], Any],
    answered: Callable[[], bool],
    on_requested: Callable[[int], None] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> ActionResult:
    """Send the N-ACTION (`on_requested` is told its success status) and keep the association open up to
    ``cfg.commitment_wait_s`` for a report on it (handled by `on_report`); stops waiting when
    `answered()` says a report came another way."""
    watch = _AssociationWatch()
    reported = threading.Event()

    def report_handler(event: evt.Event) -> Any:
        try:
            return on_report(event)
        finally:
            reported.set()

    try:
        assoc = _open(
            destination,
            calling_ae,
            cfg.timeout_s,
            ssl_context,
            [build_context(STORAGE_COMMITMENT)],
            watch,
            "storage commitment",
            extra_handlers=[(evt.EVT_N_EVENT_REPORT, report_handler)],
        )
        if not assoc.is_established:
            if not watch.connected:
                raise _diagnose_connect(destination, ssl_context if destination.tls else None, cfg.timeout_s)
            if watch.rejection is None and not assoc.accepted_contexts:
                raise SendError(f"{destination.ae_title} does not accept Storage Commitment Push Model")
            raise watch.error(destination)
    except SendError as e:
        return ActionResult(False, None, e.reason)
    try:
        try:
            rsp, _ = assoc.send_n_action(
                request_dataset(transaction_uid, references),
                ACTION_REQUEST_COMMITMENT,
                STORAGE_COMMITMENT,
                STORAGE_COMMITMENT_INSTANCE,
            )
        except (RuntimeError, ValueError) as e:  # the association ended, or no usable context
            return ActionResult(False, None, f"N-ACTION not sent: {e}")
        status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        if status is None:
            return ActionResult(False, None, watch.reason() or "no N-ACTION response (DIMSE timeout or abort)")
        if status != SUCCESS:
            comment = f" ({rsp.ErrorComment})" if "ErrorComment" in rsp else ""
            return ActionResult(False, status, f"N-ACTION status 0x{status:04X}{comment}")
        if on_requested is not None:
            on_requested(status)
        deadline = time.monotonic() + cfg.commitment_wait_s
        while time.monotonic() < deadline and assoc.is_established and not reported.is_set():
            if answered():
                break
            reported.wait(0.2)
        return ActionResult(True, status)
    finally:
        if assoc.is_established:
            assoc.release()


# --- SCP: a sender asks the node to commit what it sent ----------------------------------------------


@dataclass
class _Pending:
    report: Report
    requester: str
    response_sent: threading.Event = field(default_factory=threading.Event)


class CommitmentSCP:
    """N-ACTION handling for :class:`node.ingest.scp.StorageSCP`, and the N-EVENT-REPORT that answers it."""

    def __init__(self, settings: Settings, store: AuditStore) -> None:
        self.settings = settings
        self.store = store
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()

    def evaluate(self, transaction_uid: str, references: Sequence[Reference]) -> Report:
        """Committed: the instance is recorded (not rejected or a duplicate row), of that SOP class,
        and its file is in the spool. Anything else fails with the reason."""
        committed: list[Reference] = []
        failed: list[tuple[Reference, int]] = []
        for ref in references:
            inst = self.store.find_live_instance(ref.sop_instance_uid)
            if inst is None or not inst.spool_path or not Path(inst.spool_path).is_file():
                failed.append((ref, NO_SUCH_OBJECT_INSTANCE))
            elif inst.sop_class_uid != ref.sop_class_uid:
                failed.append((ref, CLASS_INSTANCE_CONFLICT))
            else:
                committed.append(ref)
        return Report(transaction_uid, committed, failed)

    def on_n_action(self, event: evt.Event, association_id: int | None) -> tuple[int | Dataset, None]:
        assoc = event.assoc
        requester = assoc.requestor.ae_title.strip()
        req = event.request
        if str(getattr(req, "RequestedSOPClassUID", "")) != STORAGE_COMMITMENT:
            return _status_dataset(PROCESSING_FAILURE, "only Storage Commitment is supported"), None
        if event.action_type != ACTION_REQUEST_COMMITMENT:
            return NO_SUCH_ACTION_TYPE, None
        try:
            transaction_uid, references = parse_request(event.action_information)
        except Exception as e:  # noqa: BLE001 — a peer's malformed request: answered 0x0115 with the reason
            reason = f"{e}" if isinstance(e, ValueError) else f"undecodable request: {type(e).__name__}"
            self.store.add_event(
                "commitment.bad_request",
                association_id=association_id,
                detail={"requester": requester, "error": reason},
            )
            metrics.count_commitment("scp", "bad_request")
            return _status_dataset(INVALID_ARGUMENT_VALUE, reason), None
        try:
            report = self.evaluate(transaction_uid, references)
            self.store.add_event(
                "commitment.request_received",
                association_id=association_id,
                detail={
                    "transaction_uid": transaction_uid,
                    "requester": requester,
                    "instances": len(references),
                    "committed": len(report.committed),
                    "failed": len(report.failed),
                },
            )
        except Exception:
            log.exception("answering storage commitment %s failed", transaction_uid)
            return PROCESSING_FAILURE, None
        pending = _Pending(report, requester)
        with self._lock:
            self._pending[id(assoc)] = pending
        threading.Thread(
            target=self._deliver,
            args=(assoc, pending, association_id),
            name=f"commitment-report-{transaction_uid[-8:]}",
            daemon=True,
        ).start()
        return SUCCESS, None

    def on_dimse_sent(self, event: evt.Event) -> None:
        """The N-ACTION response is on its way: the report may follow it on the same association."""
        if type(event.message).__name__ != "N_ACTION_RSP":
            return
        with self._lock:
            pending = self._pending.pop(id(event.assoc), None)
        if pending is not None:
            pending.response_sent.set()

    def _deliver(self, assoc: Association, pending: _Pending, association_id: int | None) -> None:
        report = pending.report
        via, status, error = "", None, ""
        try:
            if pending.response_sent.wait(self.settings.dicom.dimse_timeout):
                # The response is queued by the association's own thread inside its request handler;
                # wait until that handler has returned before sending on the same association.
                deadline = time.monotonic() + 5.0
                while assoc.is_established and assoc._is_paused and time.monotonic() < deadline:
                    time.sleep(0.002)
            else:  # the response never went out (association aborted): forget it, report elsewhere
                with self._lock:
                    if self._pending.get(id(assoc)) is pending:
                        del self._pending[id(assoc)]
            if _same_association(assoc):
                via = "same association"
                status, error = _send_report(assoc, report)
            if status != SUCCESS:
                via = "new association"
                for delay in (*REPORT_RETRY_DELAYS_S, None):  # a requester's SCP may be busy for a moment
                    status, error = self._report_on_new_association(pending.requester, report)
                    if status == SUCCESS or delay is None or error.startswith(NOT_REACHABLE):
                        break
                    time.sleep(delay)
        except Exception as e:  # never let a report thread die silently
            log.exception("storage commitment report %s failed", report.transaction_uid)
            error = f"{type(e).__name__}: {e}"
        ok = status == SUCCESS
        self.store.add_event(
            "commitment.answered" if ok else "commitment.report_failed",
            association_id=association_id,
            detail={
                "transaction_uid": report.transaction_uid,
                "requester": pending.requester,
                "via": via,
                "committed": len(report.committed),
                "failed": len(report.failed),
                **({"error": error} if error else {}),
            },
        )
        metrics.count_commitment("scp", "answered" if ok else "report_failed")

    def _report_on_new_association(self, requester: str, report: Report) -> tuple[int | None, str]:
        """Open an association to the requester's AE (as SCP of the SOP class) and send the report."""
        entry = self.store.get_ae(requester)
        if entry is None or entry.host is None or entry.port is None:
            return None, f"{NOT_REACHABLE}: {requester!r} is not a known AE with host and port"
        destination = Destination(entry.name, entry.host, entry.port, entry.tls)
        ssl_context = tls_client_context(self.settings.dicom.tls) if entry.tls else None
        if entry.tls and ssl_context is None:
            return None, "TLS needed but not configured"
        ae = AE(ae_title=self.settings.dicom.ae_title)
        for timeout in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(ae, timeout, self.settings.sender.timeout_s)
        ae.add_requested_context(STORAGE_COMMITMENT)
        watch = _AssociationWatch()
        tls_args = (ssl_context, entry.host) if ssl_context is not None else None
        assoc = ae.associate(
            entry.host,
            entry.port,
            ae_title=entry.name,
            tls_args=tls_args,
            ext_neg=[build_role(STORAGE_COMMITMENT, scp_role=True)],
            evt_handlers=watch.handlers(),
        )
        result, status, error = "failed", None, ""
        try:
            if not assoc.is_established:
                error = (
                    watch.error(destination)
                    if watch.connected
                    else _diagnose_connect(destination, ssl_context, self.settings.sender.timeout_s)
                ).reason
                return None, error
            status, error = _send_report(assoc, report)
            result = "released"
            return status, error
        finally:
            if assoc.is_established:
                assoc.release()
            self.store.record_association(
                calling_ae=self.settings.dicom.ae_title,
                called_ae=entry.name,
                peer_host=entry.host,
                peer_port=entry.port,
                result=result,
                reason=error,
                tls=entry.tls,
                direction="outbound",
            )


def _same_association(assoc: Association) -> bool:
    """Whether the report goes on the requester's association: it is still open and not being released,
    and the requester did not take the SCP role for Storage Commitment on it (SCP/SCU Role Selection),
    which says it expects the report on an association of the node's own (PS3.4 J.3.3)."""
    if not assoc.is_established or assoc.acse.is_release_requested():
        return False
    return not any(cx.abstract_syntax == STORAGE_COMMITMENT and cx.as_scu for cx in assoc.accepted_contexts)


def _send_report(assoc: Association, report: Report) -> tuple[int | None, str]:
    try:
        rsp, _ = assoc.send_n_event_report(
            report.to_dataset(), report.event_type, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
        )
    except (RuntimeError, ValueError) as e:  # e.g. the association ended, or no usable context
        return None, str(e)
    status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
    if status is None:
        return None, "no N-EVENT-REPORT response"
    return status, "" if status == SUCCESS else f"N-EVENT-REPORT status 0x{status:04X}"


def expire_overdue(store: AuditStore, cfg: SenderConfig, now: datetime | None = None) -> int:
    """Commitments past their deadline without a report: their exports are sent again (or dead)."""
    n = 0
    for row in store.overdue_commitments(now):
        reason = f"no N-EVENT-REPORT within {cfg.commitment_timeout_s:g} s of the request"
        if store.fail_commitment(row.transaction_uid, reason, retry_at=retry_at(cfg), expired=True) is not None:
            log.warning("storage commitment %s to %s expired: sending again", row.transaction_uid, row.destination_ae)
            metrics.count_commitment("scu", "expired")
            n += 1
    return n
