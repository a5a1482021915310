"""The audit store's exports: result deliveries, their attempts, re-queues, retention of files, and the
storage commitments asked of destinations (writes and reads).

A mixin of :class:`node.audit.store.AuditStore`, kept apart for size: the same rules hold (every
write one transaction, every change an event in it). An attempt that leaves no export of a run
pending settles its instance (``exported`` or ``dead``) in the same transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from node.audit.models import (
    CommitmentState,
    Export,
    ExportAttempt,
    ExportState,
    Instance,
    InstanceState,
    StorageCommitment,
    Study,
    utcnow,
)
from node.audit.txn import NewExport, StoreError, _add_export, _event, _settle

#: When an export whose send was not committed goes out again, given its attempts so far (None: dead).
RetryAt = Callable[[int], datetime | None]


class ExportStoreMixin:
    session: Callable[[], AbstractContextManager[Session]]
    node: str

    # -- exports --------------------------------------------------------------------------------------

    def create_export(
        self, instance_id: int, *, destination_ae: str, kind: str, file_path: str, sop_instance_uid: str = ""
    ) -> Export:
        """Register a result object to deliver (state ``pending``, due now)."""
        with self.session() as s:
            return _add_export(s, instance_id, NewExport(destination_ae, kind, file_path, sop_instance_uid))

    def record_export_attempt(
        self,
        export_id: int,
        *,
        status: int | None,
        error: str = "",
        succeeded: bool,
        next_attempt_at: datetime | None = None,
        give_up: bool = False,
        association_id: int | None = None,
        started_at: datetime | None = None,
        on_settled: Callable[[Instance], None] | None = None,
    ) -> Export:
        """Log one send attempt; ``succeeded`` → sent, ``give_up`` → dead, else pending until next_attempt_at.

        In the same transaction the instance is settled once its run has no pending export left:
        ``exported`` when every export was sent, ``dead`` when one is dead. `on_settled` is called with
        the instance after the commit when this attempt settled it.
        """
        with self.session() as s:
            row = s.get(Export, export_id, with_for_update=True)
            if row is None:
                raise StoreError(f"no export with id {export_id}")
            now = utcnow()
            s.add(
                ExportAttempt(
                    export_id=export_id,
                    association_id=association_id,
                    started_at=started_at or now,
                    finished_at=now,
                    status=status,
                    error=error,
                )
            )
            row.attempts += 1
            row.last_error = "" if succeeded else error
            if succeeded:
                row.state, row.sent_at, row.next_attempt_at = ExportState.SENT, now, None
                row.commitment_id, row.committed_at = None, None  # no commitment asked for this send
            elif give_up:
                row.state, row.next_attempt_at = ExportState.DEAD, None
            else:
                row.next_attempt_at = next_attempt_at
            _event(
                s,
                f"export.{'sent' if succeeded else 'dead' if give_up else 'retry'}",
                instance_id=row.instance_id,
                detail={
                    "export_id": export_id,
                    "attempt": row.attempts,
                    "destination": row.destination_ae,
                    "status": None if status is None else f"0x{status:04X}",
                    "error": error,
                    **(
                        {"retry_at": next_attempt_at.isoformat()}
                        if row.state == ExportState.PENDING and next_attempt_at is not None
                        else {}
                    ),
                },
            )
            settled = _settle(s, row.instance_id) if succeeded or give_up else None
        if settled is not None and on_settled is not None:
            on_settled(settled)
        return row

    def due_exports(self, now: datetime | None = None, limit: int = 100, *, own: bool = False) -> list[Export]:
        """Pending exports whose next attempt time has come; with `own`, only those whose files this
        node holds (each export is sent by its node alone: never twice, whichever node is up)."""
        when = now or utcnow()
        q = (
            select(Export)
            .where(Export.state == ExportState.PENDING)
            .where(or_(Export.next_attempt_at.is_(None), Export.next_attempt_at <= when))
            .order_by(Export.next_attempt_at, Export.id)
            .limit(limit)
        )
        if own:
            q = q.where(Export.node == self.node)
        with self.session() as s:
            return list(s.scalars(q))

    def list_exports(self, instance_id: int | None = None, *, state: str | None = None) -> list[Export]:
        q = select(Export).order_by(Export.id)
        if instance_id is not None:
            q = q.where(Export.instance_id == instance_id)
        if state is not None:
            q = q.where(Export.state == state)
        with self.session() as s:
            return list(s.scalars(q))

    def requeue_exports(
        self,
        *,
        actor: str,
        export_ids: Sequence[int] | None = None,
        instance_id: int | None = None,
        states: Sequence[ExportState] = (ExportState.DEAD,),
        kind: str = "export.requeued",
    ) -> list[int]:
        """Exports in `states` (by id and/or instance) pending again, due now, with a fresh attempt budget
        (their attempt history is kept); one `kind` event per export, in the same transaction."""
        if export_ids is None and instance_id is None:
            raise ValueError("requeue_exports needs export ids or an instance id")
        q = select(Export).where(Export.state.in_([str(st) for st in states])).order_by(Export.id)
        if export_ids is not None:
            q = q.where(Export.id.in_(list(export_ids)))
        if instance_id is not None:
            q = q.where(Export.instance_id == instance_id)
        done: list[int] = []
        with self.session() as s:
            for row in s.scalars(q.with_for_update()):
                previous = row.state
                row.state, row.attempts, row.next_attempt_at = ExportState.PENDING, 0, utcnow()
                _event(
                    s,
                    kind,
                    actor=actor,
                    instance_id=row.instance_id,
                    detail={"export_id": row.id, "from": previous, "destination": row.destination_ae, "kind": row.kind},
                )
                done.append(row.id)
        return done

    def purge_files(
        self,
        *,
        states: Sequence[InstanceState],
        finished_before: datetime,
        limit: int,
        remove: Callable[[Instance], list[str]],
        detail: dict[str, Any],
    ) -> int:
        """This node's instances in `states` finished before the cutoff that still have files: `remove(row)` deletes
        them (returns what it removed) while the rows are locked, then their paths are cleared, each
        with an `instance.purged` event, in the same transaction. Returns how many."""
        q = (
            select(Instance)
            .where(Instance.state.in_([str(x) for x in states]))
            .where(Instance.finished_at < finished_before)
            .where(Instance.node == self.node)  # another node's files are on its disk
            .where(or_(Instance.spool_path != "", Instance.quarantine_path != ""))
            .order_by(Instance.id)
            .limit(limit)
            .with_for_update()
        )
        n = 0
        with self.session() as s:
            for row in s.scalars(q).all():
                removed = remove(row)
                row.spool_path, row.quarantine_path = "", ""
                _event(
                    s,
                    "instance.purged",
                    actor="retention",
                    instance_id=row.id,
                    study_id=row.study_id,
                    detail={**detail, "removed": removed},
                )
                n += 1
        return n

    def result_objects(self, study_instance_uid: str) -> list[Export]:
        """One export row per result object (SEG, SR, overlay) the node made for a study, oldest first."""
        q = (
            select(Export)
            .join(Instance, Export.instance_id == Instance.id)
            .join(Study, Instance.study_id == Study.id)
            .where(Study.study_instance_uid == study_instance_uid)
            .where(Export.sop_instance_uid != "")
            .order_by(Export.id)
        )
        with self.session() as s:
            seen: dict[str, Export] = {}
            for row in s.scalars(q):
                seen.setdefault(row.sop_instance_uid, row)
            return list(seen.values())

    def list_export_attempts(self, export_id: int) -> list[ExportAttempt]:
        with self.session() as s:
            return list(
                s.scalars(select(ExportAttempt).where(ExportAttempt.export_id == export_id).order_by(ExportAttempt.id))
            )

    # -- storage commitment (node.export.commitment) ------------------------------------------------------------

    def record_sent_for_commitment(
        self,
        sent: Sequence[tuple[int, int]],
        *,
        transaction_uid: str,
        destination_ae: str,
        references: Sequence[dict[str, Any]],
        deadline_at: datetime,
        started_at: datetime | None = None,
    ) -> StorageCommitment:
        """Exports a destination that takes storage commitment has stored ((export id, C-STORE status)):
        each gets its attempt row and becomes ``committing`` under one new commitment transaction
        (``pending`` until `deadline_at`), all in ONE transaction, written before the N-ACTION goes out."""
        with self.session() as s:
            now = utcnow()
            row = StorageCommitment(
                transaction_uid=transaction_uid,
                destination_ae=destination_ae,
                state=CommitmentState.PENDING,
                sop_references=list(references),
                requested_at=now,
                deadline_at=deadline_at,
                reason="",
            )
            s.add(row)
            s.flush()
            for export_id, status in sent:
                export = s.get(Export, export_id, with_for_update=True)
                if export is None:
                    raise StoreError(f"no export with id {export_id}")
                s.add(
                    ExportAttempt(
                        export_id=export_id, started_at=started_at or now, finished_at=now, status=status, error=""
                    )
                )
                export.attempts += 1
                export.state, export.sent_at, export.next_attempt_at = ExportState.COMMITTING, now, None
                export.last_error, export.commitment_id, export.committed_at = "", row.id, None
                _event(
                    s,
                    "export.sent",
                    instance_id=export.instance_id,
                    detail={
                        "export_id": export_id,
                        "attempt": export.attempts,
                        "destination": destination_ae,
                        "status": f"0x{status:04X}",
                        "error": "",
                        "commitment": transaction_uid,
                    },
                )
            _event(
                s,
                "commitment.opened",
                detail={
                    "transaction_uid": transaction_uid,
                    "destination": destination_ae,
                    "instances": len(references),
                    "deadline_at": deadline_at.isoformat(timespec="seconds"),
                },
            )
            return row

    def record_commitment_requested(self, transaction_uid: str, *, status: int) -> None:
        """The destination answered the N-ACTION with a success status: the report is awaited."""
        with self.session() as s:
            row = _commitment(s, transaction_uid)
            _event(
                s,
                "commitment.requested",
                detail={
                    "transaction_uid": transaction_uid,
                    "destination": row.destination_ae,
                    "status": f"0x{status:04X}",
                },
            )

    def record_commitment_report(
        self,
        transaction_uid: str,
        *,
        committed: Sequence[str],
        failed: dict[str, str],
        via: str,
        retry_at: RetryAt,
        on_settled: Callable[[Instance], None] | None = None,
    ) -> StorageCommitment | None:
        """An N-EVENT-REPORT for a commitment the node asked for. Committed instances' exports become
        ``committed``; failed ones, and any the report does not mention, are sent again (`retry_at`
        gives when, None: dead). A report for an unknown or already closed transaction is only audited;
        returns None then."""
        with self.session() as s:
            row = s.scalar(
                select(StorageCommitment).where(StorageCommitment.transaction_uid == transaction_uid).with_for_update()
            )
            detail = {
                "transaction_uid": transaction_uid,
                "via": via,
                "committed": len(committed),
                "failed": len(failed),
            }
            if row is None or row.state != CommitmentState.PENDING:
                kind = "commitment.unknown_report" if row is None else "commitment.late_report"
                _event(s, kind, detail={**detail, **({"state": row.state} if row is not None else {})})
                return None
            missing = "not named in the N-EVENT-REPORT"
            outcome = _close_commitment(s, row, set(committed), failed, missing, retry_at)
            row.state = CommitmentState.COMMITTED if not outcome.failed else CommitmentState.FAILED
            row.reason = "" if not outcome.failed else "; ".join(sorted({r for r in outcome.failed.values()}))[:500]
            _event(
                s,
                f"commitment.{row.state}",
                detail={**detail, "destination": row.destination_ae, **({"reasons": row.reason} if row.reason else {})},
            )
        for inst in outcome.settled:
            if on_settled is not None:
                on_settled(inst)
        return row

    def fail_commitment(
        self, transaction_uid: str, reason: str, *, retry_at: RetryAt, expired: bool = False
    ) -> StorageCommitment | None:
        """The N-ACTION failed, or no report came by the deadline (`expired`): every export of the
        transaction is sent again (or dead). None when the transaction is not pending any more."""
        with self.session() as s:
            row = s.scalar(
                select(StorageCommitment).where(StorageCommitment.transaction_uid == transaction_uid).with_for_update()
            )
            if row is None or row.state != CommitmentState.PENDING:
                return None
            _close_commitment(s, row, set(), {}, reason, retry_at)
            row.state = CommitmentState.EXPIRED if expired else CommitmentState.FAILED
            row.reason = reason
            _event(
                s,
                f"commitment.{row.state}",
                detail={"transaction_uid": transaction_uid, "destination": row.destination_ae, "reason": reason},
            )
            return row

    def overdue_commitments(self, now: datetime | None = None) -> list[StorageCommitment]:
        """Pending commitments whose report deadline has passed (also those of a node that was down)."""
        q = (
            select(StorageCommitment)
            .where(StorageCommitment.state == CommitmentState.PENDING)
            .where(StorageCommitment.deadline_at <= (now or utcnow()))
            .order_by(StorageCommitment.id)
        )
        with self.session() as s:
            return list(s.scalars(q))

    def list_commitments(
        self, *, destination_ae: str | None = None, state: str | None = None, limit: int | None = None
    ) -> list[StorageCommitment]:
        q = select(StorageCommitment).order_by(StorageCommitment.id.desc())
        if destination_ae is not None:
            q = q.where(StorageCommitment.destination_ae == destination_ae)
        if state is not None:
            q = q.where(StorageCommitment.state == state)
        with self.session() as s:
            return list(s.scalars(q.limit(limit) if limit else q))

    def get_commitment(self, transaction_uid: str) -> StorageCommitment | None:
        with self.session() as s:
            return s.scalar(select(StorageCommitment).where(StorageCommitment.transaction_uid == transaction_uid))


# -- helpers (inside a session) -------------------------------------------------------------------------


@dataclass
class _CommitmentOutcome:
    failed: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> reason
    settled: list[Instance] = field(default_factory=list)


def _commitment(s: Session, transaction_uid: str) -> StorageCommitment:
    row = s.scalar(select(StorageCommitment).where(StorageCommitment.transaction_uid == transaction_uid))
    if row is None:
        raise StoreError(f"no storage commitment {transaction_uid}")
    return row


def _close_commitment(
    s: Session,
    row: StorageCommitment,
    committed: set[str],
    failed: dict[str, str],
    default_reason: str,
    retry_at: RetryAt,
) -> _CommitmentOutcome:
    """Settle the ``committing`` exports of `row`: committed, or sent again / dead with the reason."""
    outcome = _CommitmentOutcome()
    now = utcnow()
    uid_of = {int(r["export_id"]): str(r["sop_instance_uid"]) for r in row.sop_references}
    exports = s.scalars(
        select(Export)
        .where(Export.commitment_id == row.id)
        .where(Export.state == ExportState.COMMITTING)
        .with_for_update()
    )
    instances: set[int] = set()
    for export in exports:
        uid = uid_of.get(export.id, export.sop_instance_uid)
        detail: dict[str, Any] = {
            "export_id": export.id,
            "destination": export.destination_ae,
            "commitment": row.transaction_uid,
        }
        if uid in committed:
            export.state, export.committed_at = ExportState.COMMITTED, now
            _event(s, "export.committed", instance_id=export.instance_id, detail=detail)
        else:
            reason = failed.get(uid, default_reason)
            outcome.failed[uid] = reason
            when = retry_at(export.attempts)
            export.last_error = f"storage commitment: {reason}"
            if when is None:
                export.state, export.next_attempt_at = ExportState.DEAD, None
            else:
                export.state, export.next_attempt_at = ExportState.PENDING, when
            _event(
                s,
                "export.dead" if when is None else "export.retry",
                instance_id=export.instance_id,
                detail={**detail, "attempt": export.attempts, "error": export.last_error},
            )
        instances.add(export.instance_id)
    for instance_id in sorted(instances):
        settled = _settle(s, instance_id)
        if settled is not None:
            outcome.settled.append(settled)
    return outcome
