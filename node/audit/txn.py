"""What the audit store's parts do inside one session: events, instance transitions, exports and how a
run settles. Shared by node.audit.store and its mixins (ae_store, export_store, triage_store), so
that every write path appends its event and checks its transition the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.audit.models import (
    DELIVERED_EXPORT_STATES,
    FINAL_STATES,
    STATE_TIMESTAMP,
    Event,
    Export,
    ExportState,
    Instance,
    InstanceState,
    utcnow,
)

log = logging.getLogger("node.audit.store")  # the store's log, whichever part writes
_T = TypeVar("_T")

# Allowed instance transitions (besides staying in the same state). Failed/dead may be retried by an operator.
TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    InstanceState.RECEIVED: frozenset({InstanceState.QUEUED, InstanceState.SKIPPED, InstanceState.FAILED}),
    InstanceState.QUEUED: frozenset({InstanceState.ANALYZED, InstanceState.SKIPPED, InstanceState.FAILED}),
    InstanceState.ANALYZED: frozenset({InstanceState.EXPORTED, InstanceState.DEAD, InstanceState.FAILED}),
    InstanceState.EXPORTED: frozenset({InstanceState.QUEUED}),
    InstanceState.SKIPPED: frozenset({InstanceState.QUEUED}),
    InstanceState.FAILED: frozenset({InstanceState.QUEUED}),
    InstanceState.DEAD: frozenset({InstanceState.QUEUED, InstanceState.EXPORTED}),
    InstanceState.DUPLICATE: frozenset(),
    InstanceState.REJECTED: frozenset(),
}


class StoreError(Exception):
    """A request the audit store refuses (unknown row, illegal transition, duplicate name)."""


@dataclass(frozen=True)
class NewExport:
    """A result object to register for delivery: one file to one destination AE."""

    destination_ae: str
    kind: str  # seg | sr | overlay
    file_path: str
    sop_instance_uid: str = ""


def _event(
    s: Session,
    kind: str,
    *,
    actor: str = "node",
    instance_id: int | None = None,
    study_id: int | None = None,
    association_id: int | None = None,
    detail: dict[str, Any] | None = None,
) -> int:
    row = Event(
        kind=kind,
        actor=actor,
        instance_id=instance_id,
        study_id=study_id,
        association_id=association_id,
        detail=detail or {},
    )
    s.add(row)
    s.flush()
    return row.id


def _locked_instance(s: Session, instance_id: int) -> Instance:
    row = s.get(Instance, instance_id, with_for_update=True)
    if row is None:
        raise StoreError(f"no instance with id {instance_id}")
    return row


def _stale(s: Session, row: Instance, job_id: str, *, force: bool = False) -> bool:
    """True (and an ``analysis.stale_result`` event) unless `row` is ``queued`` for the run `job_id`."""
    if not force and row.state == InstanceState.QUEUED and row.job_id == job_id:
        return False
    log.info("dropping result %s: instance %d is %s (current job %s)", job_id, row.id, row.state, row.job_id)
    _event(
        s,
        "analysis.stale_result",
        instance_id=row.id,
        study_id=row.study_id,
        detail={"job_id": job_id, "state": str(row.state)},
    )
    return True


def _transition(
    s: Session,
    row: Instance,
    new: InstanceState,
    reason: str | None = None,
    *,
    actor: str = "node",
    detail: dict[str, Any] | None = None,
) -> None:
    """Move `row` to `new` (checked against TRANSITIONS), fill its stage timestamp, append the event."""
    old = InstanceState(row.state)
    if new != old and new not in TRANSITIONS[old]:
        raise StoreError(f"instance {row.id}: {old} -> {new} is not allowed")
    now = utcnow()
    row.state = new
    if reason is not None:
        row.reason = reason
    if new in STATE_TIMESTAMP:
        setattr(row, STATE_TIMESTAMP[new], now)
    row.finished_at = now if new in FINAL_STATES else None
    _event(
        s,
        f"instance.{new}",
        actor=actor,
        instance_id=row.id,
        study_id=row.study_id,
        detail={"from": str(old), **({"reason": reason} if reason else {}), **(detail or {})},
    )


def _add_export(s: Session, instance_id: int, export: NewExport) -> Export:
    owner = s.get(Instance, instance_id)
    # Sent by the node that holds the instance (and so the result files built from its spool file).
    row = Export(
        instance_id=instance_id,
        destination_ae=export.destination_ae,
        kind=export.kind,
        file_path=export.file_path,
        sop_instance_uid=export.sop_instance_uid,
        next_attempt_at=utcnow(),
        node=owner.node if owner is not None and owner.node else s.info.get("node", ""),
    )
    s.add(row)
    s.flush()
    _event(
        s,
        "export.created",
        instance_id=instance_id,
        detail={"export_id": row.id, "kind": export.kind, "destination": export.destination_ae},
    )
    return row


def _settle(s: Session, instance_id: int) -> Instance | None:
    """``exported`` when every export of the current run is sent, ``dead`` when none is pending and one
    is dead; returns the instance when it moved. Exports of earlier runs (before a re-queue) do not count."""
    row = _locked_instance(s, instance_id)
    if row.state not in (InstanceState.ANALYZED, InstanceState.DEAD):
        return None
    q = select(Export).where(Export.instance_id == instance_id).order_by(Export.id)
    if row.queued_at is not None:
        q = q.where(Export.created_at >= row.queued_at)
    exports = list(s.scalars(q))
    states = {e.state for e in exports}
    if not exports or ExportState.PENDING in states or ExportState.COMMITTING in states:
        return None
    if states <= DELIVERED_EXPORT_STATES:
        _transition(s, row, InstanceState.EXPORTED)
        return row
    if row.state != InstanceState.DEAD:
        dead = [e for e in exports if e.state == ExportState.DEAD]
        _transition(s, row, InstanceState.DEAD, f"{len(dead)} export(s) undeliverable: {dead[-1].last_error}")
        return row
    return None


def _get(s: Session, model: type[_T], key: int) -> _T:
    row = s.get(model, key)
    if row is None:
        raise StoreError(f"no {model.__name__} with id {key}")
    return row
