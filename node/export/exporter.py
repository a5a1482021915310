"""Delivers pending exports (SEG, SR, overlay) to their destinations, with retries and a dead letter.

The exports table is the queue: a row is `pending` with a due time until it is sent, or `dead` after
`sender.max_attempts`. Result files stay on disk until acknowledged. Each pass groups the due
exports by destination and sends each group on one association (a STOW-RS destination: in one
request, :mod:`node.dicomweb.client`); every attempt is audited, and the
attempt that leaves no export of a run pending settles its instance (``exported`` or ``dead``) in the
same transaction (:meth:`AuditStore.record_export_attempt`).

A destination with ``storage_commitment`` on is then asked to commit what it stored
(:mod:`node.export.commitment`): those exports wait as ``committing`` until the N-EVENT-REPORT makes them
``committed``; a failure, or no report by ``sender.commitment_timeout_s``, makes them due again with
the same backoff and dead letter as a failed send.
"""

from __future__ import annotations

import logging
import ssl
from collections import defaultdict
from datetime import datetime, timedelta

from pydicom.uid import generate_uid

from node.audit import AuditStore, InstanceState
from node.audit.models import Export, Instance, as_utc, utcnow
from node.dicomweb.client import StowDestination, https_verify, send_stow
from node.export import commitment
from node.export.sender import Destination, FileStatus, SendError, backoff_delay, send, tls_client_context
from node.runtime import metrics
from node.runtime.config import Settings
from node.runtime.loop import BackgroundLoop

log = logging.getLogger(__name__)


class Exporter(BackgroundLoop):
    def __init__(self, settings: Settings, store: AuditStore, *, interval_s: float = 1.0) -> None:
        super().__init__("exporter", interval_s)
        self.settings = settings
        self.store = store

    def run_once(self) -> int:
        """One pass over the due exports; returns how many were sent."""
        commitment.expire_overdue(self.store, self.settings.sender)
        groups: dict[str, list[Export]] = defaultdict(list)
        for export in self.store.due_exports(limit=200, own=True):  # this node holds their files
            groups[export.destination_ae].append(export)
        sent = 0
        for ae_title, exports in groups.items():
            sent += self._deliver(ae_title, exports)
        return sent

    def _deliver(self, ae_title: str, exports: list[Export]) -> int:
        ae = self.store.get_ae(ae_title)
        if ae is None or not ae.may_receive or (not ae.stow and (ae.host is None or ae.port is None)):
            why = (
                f"destination {ae_title!r} is not a known AE title"
                if ae is None
                else f"AE {ae_title!r} has no host/port or is not a destination (role {ae.role})"
            )
            for export in exports:
                self._record(export, None, why, retryable=False)
            return 0
        started = utcnow()
        cfg = self.settings.sender
        ssl_context: ssl.SSLContext | None = None
        # A DICOM peer (C-STORE, and storage commitment when its entry asks); else a STOW-RS url.
        dicom = (
            None if ae.stow or ae.host is None or ae.port is None else Destination(ae.name, ae.host, ae.port, ae.tls)
        )
        try:
            if dicom is None:
                assert ae.url is not None
                statuses = send_stow(
                    [e.file_path for e in exports],
                    StowDestination(ae.name, ae.url, ae.auth, ae.username, ae.secret),
                    timeout_s=cfg.timeout_s,
                    verify=https_verify(self.settings.dicom.tls),
                )
            else:
                ssl_context = tls_client_context(self.settings.dicom.tls) if ae.tls else None
                statuses = send(
                    [e.file_path for e in exports],
                    dicom,
                    calling_ae=cfg.calling_ae or self.settings.dicom.ae_title,
                    timeout_s=cfg.timeout_s,
                    ssl_context=ssl_context,
                )
        except SendError as e:
            log.warning("export to %s failed: %s", ae_title, e.reason)
            for export in exports:
                self._record(export, None, e.reason, retryable=e.retryable, started=started)
            return 0
        except Exception as e:  # an unreadable result file, say: audit it, never kill the loop
            log.exception("export to %s failed", ae_title)
            for export in exports:
                self._record(export, None, f"{type(e).__name__}: {e}", retryable=True, started=started)
            return 0
        sent = 0
        stored: list[tuple[Export, FileStatus]] = []
        commit_to = dicom if ae.storage_commitment else None
        for export, status in zip(exports, statuses, strict=True):
            if status.ok and commit_to is not None:
                stored.append((export, status))
            else:
                self._record(
                    export, status.status, _error(status), retryable=status.retryable, ok=status.ok, started=started
                )
            sent += status.ok
        if stored and commit_to is not None:
            self._request_commitment(ae.name, commit_to, stored, started, ssl_context)
        return sent

    def _request_commitment(
        self,
        ae_title: str,
        destination: Destination,
        stored: list[tuple[Export, FileStatus]],
        started: datetime,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        """Record the stored exports as ``committing`` under a new transaction, then send the N-ACTION."""
        cfg = self.settings.sender
        transaction_uid = generate_uid()
        refs = [commitment.Reference(st.sop_class_uid, st.sop_instance_uid) for _, st in stored]
        self.store.record_sent_for_commitment(
            [(e.id, int(st.status or 0)) for e, st in stored],
            transaction_uid=transaction_uid,
            destination_ae=ae_title,
            started_at=started,
            references=[
                {"export_id": e.id, "sop_class_uid": st.sop_class_uid, "sop_instance_uid": st.sop_instance_uid}
                for e, st in stored
            ],
            deadline_at=utcnow() + timedelta(seconds=cfg.commitment_timeout_s),
        )
        for _ in stored:
            metrics.count_export("success")

        def answered() -> bool:
            row = self.store.get_commitment(transaction_uid)
            return row is None or row.state != "pending"

        result = commitment.request_commitment(
            destination,
            transaction_uid,
            refs,
            calling_ae=cfg.calling_ae or self.settings.dicom.ae_title,
            cfg=cfg,
            ssl_context=ssl_context,
            answered=answered,
            on_requested=lambda status: self.store.record_commitment_requested(transaction_uid, status=status),
            on_report=lambda event: commitment.handle_report_event(
                self.store, cfg, event, via="same association", on_settled=self._observe_latencies
            ),
        )
        if result.ok:
            return
        log.warning("storage commitment request to %s failed: %s", ae_title, result.error)
        metrics.count_commitment("scu", "failed")
        self.store.fail_commitment(
            transaction_uid, f"N-ACTION failed: {result.error}", retry_at=commitment.retry_at(cfg)
        )

    def _record(
        self,
        export: Export,
        status: int | None,
        error: str,
        *,
        retryable: bool,
        ok: bool = False,
        started: datetime | None = None,
    ) -> None:
        attempt = export.attempts + 1
        give_up = not ok and (not retryable or attempt >= self.settings.sender.max_attempts)
        next_at = None if ok or give_up else utcnow() + timedelta(seconds=backoff_delay(attempt, self.settings.sender))
        self.store.record_export_attempt(
            export.id,
            status=status,
            error=error,
            succeeded=ok,
            next_attempt_at=next_at,
            give_up=give_up,
            started_at=started,
            on_settled=self._observe_latencies,
        )
        metrics.count_export("success" if ok else "dead" if give_up else "retry")

    def _observe_latencies(self, inst: Instance) -> None:
        """Stage latencies of an instance that just reached `exported`, and the worker's model timings."""
        if inst.state != InstanceState.EXPORTED or inst.exported_at is None:
            return
        stages = {"total": inst.received_at, "export": inst.analyzed_at, "analysis": inst.queued_at}
        for stage, start in stages.items():
            if start is not None:
                metrics.observe_stage(stage, (as_utc(inst.exported_at) - as_utc(start)).total_seconds())
        analyzed = self.store.list_events(instance_id=inst.id, kinds=["instance.analyzed"])
        if analyzed:
            for model, ms in (analyzed[-1].detail.get("timings_ms") or {}).items():
                if model != "total":
                    metrics.observe_inference(model, float(ms) / 1000)


def _error(status: FileStatus) -> str:
    if status.ok:
        return ""
    return status.error or (f"status 0x{status.status:04X}" if status.status is not None else "no response")
