"""Changes an administrator can make from the console: re-run, re-send, dead-letter retry, C-ECHO.

Each action records who did it (`actor="web:<user>"`) in the audit log, in the same transaction as
the change. The work itself is handed to callables the node wires in at start (`enqueue_analysis`,
`kick_sender`); without them the change is still recorded and the node's resume/outbox pass picks
the instance or export up (both are idempotent), so an unwired console never loses a request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select

from node.audit.models import Event, Export, ExportState, InstanceState, utcnow
from node.audit.store import AuditStore, StoreError
from node.exporter import retry_exports

log = logging.getLogger(__name__)


class ActionError(Exception):
    """The action cannot be done now; the message is shown to the administrator."""


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    status: int | None
    detail: str
    seconds: float


def echo(host: str, port: int, called_ae: str, calling_ae: str, timeout: float = 10.0) -> EchoResult:
    """One C-ECHO to a peer (a real association); never raises for network problems."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    start = time.monotonic()
    try:
        assoc = ae.associate(host, port, ae_title=called_ae)
        if not assoc.is_established:
            reason = "association rejected" if assoc.is_rejected else "association aborted or peer unreachable"
            return EchoResult(False, None, f"{reason} ({host}:{port}, called AE {called_ae})",
                              time.monotonic() - start)
        try:
            rsp = assoc.send_c_echo()
            status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        finally:
            assoc.release()
    except (OSError, RuntimeError, ValueError) as e:
        return EchoResult(False, None, f"{type(e).__name__}: {e}", time.monotonic() - start)
    finally:
        ae.shutdown()
    elapsed = time.monotonic() - start
    if status == 0x0000:
        return EchoResult(True, status, f"success in {elapsed * 1000:.0f} ms", elapsed)
    if status is None:
        return EchoResult(False, None, "no C-ECHO response (DIMSE timeout or abort)", elapsed)
    return EchoResult(False, status, f"C-ECHO status 0x{status:04X}", elapsed)


class ConsoleActions:
    """The console's write operations. `enqueue_analysis(instance_id)` and `kick_sender()` do the work."""

    def __init__(self, store: AuditStore, *, calling_ae: str,
                 enqueue_analysis: Callable[[int], None] | None = None,
                 kick_sender: Callable[[], None] | None = None) -> None:
        self.store = store
        self.calling_ae = calling_ae
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
        """Deliver every result of an instance again (sent or dead exports back to pending)."""
        ids = self._reset_exports(user, instance_id=instance_id, states=(ExportState.SENT, ExportState.DEAD),
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
        """C-ECHO a known AE title; the attempt is audited as an outbound association and an event."""
        ae = self.store.get_ae(name)
        if ae is None:
            raise ActionError(f"no AE title {name!r}")
        if not ae.host or not ae.port:
            raise ActionError(f"AE {name} has no host and port to echo")
        result = echo(ae.host, ae.port, called_ae=ae.name, calling_ae=self.calling_ae)
        assoc_id = self.store.record_association(
            calling_ae=self.calling_ae, called_ae=ae.name, peer_host=ae.host, peer_port=ae.port,
            result="released" if result.ok else "rejected", reason="" if result.ok else result.detail,
            direction="outbound")
        self.store.add_event("ae.echo", actor=f"web:{user}", association_id=assoc_id,
                             detail={"name": ae.name, "ok": result.ok, "detail": result.detail,
                                     "ms": round(result.seconds * 1000, 1)})
        return result
