"""The node's administrative operations, one implementation for every front end.

`cxrnode ae|exports|reanalyze` and the console's buttons used to carry their own copies (the console
reset exports its own way, the CLI re-queued with other wording and events); both now call
:class:`AdminService`. A front end only parses its input, names the actor (`cli:<user>`,
`web:<user>`) and shows the message or the :class:`AdminError`.

Every change is written by :class:`node.audit.AuditStore` with its audit event in one transaction.
The work that follows is handed to callables the serving node wires in (`enqueue_analysis`,
`kick_sender`); without them (the CLI, a console on its own) the change is still recorded and the
running node's outbox and exporter passes pick it up, both idempotent, so no request is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from node.admin.ae import AdminError, EchoResult, add_ae, echo_ae, remove_ae, update_ae
from node.audit import AETitle, AuditStore, StoreError
from node.audit.models import ExportState, InstanceState
from node.runtime.config import Settings, TLSConfig

log = logging.getLogger(__name__)

__all__ = ["AdminError", "AdminService"]


class AdminService:
    """AE titles (add, remove, C-ECHO), re-analysis, re-sending results and dead-letter retries."""

    def __init__(
        self,
        store: AuditStore,
        *,
        calling_ae: str,
        tls: TLSConfig | None = None,
        enqueue_analysis: Callable[[int], None] | None = None,
        kick_sender: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.calling_ae = calling_ae
        self.tls = tls or TLSConfig()  # dicom.tls: C-ECHO reaches a TLS AE as the exporter does
        self.enqueue_analysis = enqueue_analysis
        self.kick_sender = kick_sender

    @classmethod
    def for_settings(
        cls,
        settings: Settings,
        store: AuditStore,
        *,
        enqueue_analysis: Callable[[int], None] | None = None,
        kick_sender: Callable[[], None] | None = None,
    ) -> AdminService:
        """The service as the exporter sees the network: its calling AE title and dicom.tls."""
        return cls(
            store,
            calling_ae=settings.sender.calling_ae or settings.dicom.ae_title,
            tls=settings.dicom.tls,
            enqueue_analysis=enqueue_analysis,
            kick_sender=kick_sender,
        )

    # -- AE titles ---------------------------------------------------------------------------------

    def add_ae(self, name: str, *, actor: str, **fields: Any) -> AETitle:
        """A DICOM AE, or with `url` a STOW-RS destination; `fields` are the [[ae]] keys (AE_FIELDS)."""
        return add_ae(self.store, name, actor=actor, **fields)

    def update_ae(self, name: str, *, actor: str, **fields: Any) -> AETitle:
        return update_ae(self.store, name, actor=actor, **fields)

    def remove_ae(self, name: str, *, actor: str) -> None:
        remove_ae(self.store, name, actor=actor)

    def echo_ae(self, name: str, *, actor: str, timeout: float = 10.0) -> EchoResult:
        """C-ECHO a known AE title as the exporter would reach it (TLS when the AE says so)."""
        return echo_ae(self.store, name, calling_ae=self.calling_ae, tls=self.tls, timeout=timeout, actor=actor)

    # -- instances and exports ---------------------------------------------------------------------

    def rerun(self, instance_id: int, *, actor: str) -> str:
        """Analyse a stored instance again (from exported, skipped, failed or dead)."""
        try:
            self.store.set_instance_state(instance_id, InstanceState.QUEUED, "re-analysis requested", actor=actor)
        except StoreError as e:
            raise AdminError(str(e)) from e
        if self.enqueue_analysis is None:
            return f"instance {instance_id} queued again (the node that received it publishes it within seconds)"
        try:
            self.enqueue_analysis(instance_id)
        except Exception as e:  # noqa: BLE001 — the row says queued; the outbox retries the hand-off
            log.warning("hand-off of instance %d failed, left for the outbox: %s", instance_id, e)
            return f"instance {instance_id} queued; the broker is unreachable, it will be sent when it returns"
        return f"instance {instance_id} queued for analysis"

    def resend(self, instance_id: int, *, actor: str) -> str:
        """Deliver every result of an instance again (sent, committed or dead exports back to pending)."""
        ids = self.store.requeue_exports(
            actor=actor,
            instance_id=instance_id,
            states=(ExportState.SENT, ExportState.COMMITTED, ExportState.DEAD),
            kind="export.resend",
        )
        if not ids:
            raise AdminError(f"instance {instance_id} has no results to send (re-run it first)")
        return self._kicked(f"{len(ids)} result object(s) of instance {instance_id} will be sent again")

    def retry_exports(self, export_ids: list[int], *, actor: str) -> str:
        """Dead exports due again now with a fresh attempt budget (their history is kept)."""
        ids = self.store.requeue_exports(actor=actor, export_ids=export_ids)
        if not ids:
            raise AdminError("export(s) " + ", ".join(map(str, export_ids)) + " not in the dead-letter queue")
        return self._kicked(f"{len(ids)} export(s) will be sent again")

    def retry_all_dead(self, *, actor: str) -> str:
        dead = [e.id for e in self.store.list_exports(state=ExportState.DEAD)]
        if not dead:
            raise AdminError("the dead-letter queue is empty")
        return self.retry_exports(dead, actor=actor)

    def _kicked(self, message: str) -> str:
        """Wake the exporter of this process, if any; else the running node's next pass sends."""
        if self.kick_sender is None:
            return message + " (the node holding their files sends them within seconds)"
        try:
            self.kick_sender()
        except Exception as e:  # noqa: BLE001 — pending exports are picked up by the exporter's next pass
            log.warning("could not wake the sender: %s", e)
        return message
