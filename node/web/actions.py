"""Changes an administrator can make from the console: re-run, re-send, dead-letter retry, C-ECHO.

Each action records who did it (`actor="web:<user>"`) in the audit log, in the same transaction as
the change. The work itself is handed to callables the node wires in at start (`enqueue_analysis`,
`kick_sender`); without them the change is still recorded and the node's resume/outbox pass picks
the instance or export up (both are idempotent), so an unwired console never loses a request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import select

from node.ae_admin import AdminError, EchoResult, echo_ae
from node.audit.models import Event, Export, ExportState, InstanceState, utcnow
from node.audit.store import AuditStore, StoreError
from node.config import TLSConfig
from node.exporter import retry_exports

log = logging.getLogger(__name__)


class ActionError(Exception):
    """The action cannot be done now; the message is shown to the administrator."""


class ConsoleActions:
    """The console's write operations. `enqueue_analysis(instance_id)` and `kick_sender()` do the work."""

    def __init__(self, store: AuditStore, *, calling_ae: str, tls: TLSConfig | None = None,
                 enqueue_analysis: Callable[[int], None] | None = None,
                 kick_sender: Callable[[], None] | None = None) -> None:
        self.store = store
        self.calling_ae = calling_ae
        self.tls = tls or TLSConfig()  # dicom.tls: C-ECHO reaches a TLS AE as the exporter does
        self.enqueue_analysis = enqueue_analysis
        self.kick_sender = kick_sender

    def rerun(self, instance_id: int, user: str) -> str:
        """Analyse an instance again (from exported, skipped, failed or dead)."""
        try:
            self.store.set_instance_state(instance_id, InstanceState.QUEUED, "re-run requested in the console",
                                          actor=f"web:{user}")
        except StoreError as e:
            raise ActionError(str(e)) from e
        if self.enqueue_analysis is None:
            return f"instance {instance_id} queued; the node's outbox will hand it to the workers"
        try:
            self.enqueue_analysis(instance_id)
        except Exception as e:  # noqa: BLE001 — the row says queued; the outbox retries the hand-off
            log.warning("hand-off of instance %d failed, left for the outbox: %s", instance_id, e)
            return f"instance {instance_id} queued; the broker is unreachable, it will be sent when it returns"
        return f"instance {instance_id} queued for analysis"

    def resend(self, instance_id: int, user: str) -> str:
        """Deliver every result of an instance again (sent, committed or dead exports back to pending)."""
        ids = self._reset_exports(user, instance_id=instance_id,
                                  states=(ExportState.SENT, ExportState.COMMITTED, ExportState.DEAD),
                                  kind="export.resend")
        if not ids:
            raise ActionError(f"instance {instance_id} has no results to send (re-run it first)")
        self._kick()
        return f"{len(ids)} result object(s) of instance {instance_id} will be sent again"

    def retry_export(self, export_id: int, user: str) -> str:
        """A dead export due again now with a fresh attempt budget (same code path as `cxrnode exports retry`)."""
        if retry_exports(self.store, [export_id], actor=f"web:{user}") == 0:
            raise ActionError(f"export {export_id} is not in the dead-letter queue")
        self._kick()
        return f"export {export_id} will be sent again"

    def retry_all_dead(self, user: str) -> str:
        dead = [e.id for e in self.store.list_exports(state=ExportState.DEAD)]
        n = retry_exports(self.store, dead, actor=f"web:{user}")
        self._kick()
        return f"{n} dead export(s) will be sent again"

    def _kick(self) -> None:
        if self.kick_sender is not None:
            try:
                self.kick_sender()
            except Exception as e:  # noqa: BLE001 — pending exports are picked up by the sender's next pass
                log.warning("could not wake the sender: %s", e)

    def _reset_exports(self, user: str, *, states: tuple[ExportState, ...], kind: str,
                       instance_id: int) -> list[int]:
        """Pending again, due now, attempts reset; one event per export, same transaction."""
        stmt = (select(Export).where(Export.state.in_([str(s) for s in states]))
                .where(Export.instance_id == instance_id).with_for_update())
        done: list[int] = []
        with self.store.session() as s:
            for row in s.scalars(stmt):
                previous = row.state
                row.state, row.attempts, row.next_attempt_at = ExportState.PENDING, 0, utcnow()
                s.add(Event(kind=kind, actor=f"web:{user}", instance_id=row.instance_id,
                            detail={"export_id": row.id, "from": previous, "destination": row.destination_ae,
                                    "kind": row.kind}))
                done.append(row.id)
        return done

    def echo_ae(self, name: str, user: str) -> EchoResult:
        """C-ECHO a known AE title: the node's one echo (`node.ae_admin.echo_ae`, as `cxrnode ae echo`)."""
        try:
            return echo_ae(self.store, name, calling_ae=self.calling_ae, tls=self.tls, actor=f"web:{user}")
        except AdminError as e:
            raise ActionError(str(e)) from e
