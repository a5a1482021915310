"""The audit store: the one place that writes the audit log.

Every write is one short transaction; every state change appends an :class:`Event` in the same
transaction, so the event log and the tables never disagree. Objects returned are detached
snapshots (``expire_on_commit=False``): read their attributes freely, change state only through
these methods. Thread-safe: each call opens its own session.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Engine, Select, event, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from node.audit.ae_store import AEStoreMixin
from node.audit.db import READ_ONLY, make_engine, migrate
from node.audit.export_store import ExportStoreMixin
from node.audit.models import (
    FINAL_STATES,
    PENDING_STATES,
    STATE_TIMESTAMP,
    Association,
    Event,
    Export,
    Instance,
    InstanceState,
    Study,
    parse_job_id,
    utcnow,
)
from node.audit.triage_store import TriageStoreMixin
from node.audit.txn import TRANSITIONS as TRANSITIONS
from node.audit.txn import NewExport as NewExport
from node.audit.txn import StoreError as StoreError
from node.audit.txn import _add_export, _event, _get, _locked_instance, _stale, _transition

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class DuplicateInstance(StoreError):
    """Another live row already holds this SOP Instance UID (a concurrent duplicate)."""


@dataclass(frozen=True)
class ReceivedInstance:
    """What ingest knows about an instance it has stored (or refused)."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    calling_ae: str = ""
    association_id: int | None = None
    modality: str = ""
    body_part: str = ""
    view_position: str = ""
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""
    priority: int = 0
    size_bytes: int = 0
    spool_path: str = ""
    warning: str = ""  # stored with a C-STORE warning status: why (in the instance.received event)


@dataclass(frozen=True)
class InstanceFilter:
    """Filters for :meth:`AuditStore.list_instances`; every field is optional."""

    states: Sequence[str] = ()
    calling_ae: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    study_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    node: str | None = None  # only the instances this node received
    limit: int | None = None


@dataclass
class StudySummary:
    """A study with the counts of its instances per state (for listings)."""

    study: Study
    states: dict[str, int] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)  # the nodes that received its instances

    @property
    def instance_count(self) -> int:
        return sum(self.states.values())


class AuditStore(AEStoreMixin, ExportStoreMixin, TriageStoreMixin):
    """Typed access to the audit log. Create with :meth:`open` (migrates) or from an engine.

    `node` is this process's node name (config ``node.name``): every study, instance, export and event
    it writes carries it (:func:`_stamp_node`), and the per-node queries (``own``) use it. Several
    nodes share one database; each acts only on its own rows (docs/operations.md, "Two nodes").
    """

    def __init__(self, engine: Engine, *, node: str = "") -> None:
        self.engine = engine
        self.node = node
        self._sessions = sessionmaker(engine, expire_on_commit=False, info={"node": node})
        self._reads = sessionmaker(engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False)
        event.listen(self._sessions, "before_flush", _stamp_node)

    @classmethod
    def open(cls, url: str, *, echo: bool = False, run_migrations: bool = True, node: str = "") -> AuditStore:
        engine = make_engine(url, echo=echo)
        if run_migrations:
            migrate(engine)
        return cls(engine, node=node)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on error."""
        with self._sessions.begin() as s:
            yield s

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A transaction that only reads. On SQLite it does not wait for the write lock (another writer
        may hold it for up to the busy timeout): for reads a peer waits on, such as the AE title an
        association request is checked against."""
        with self._reads.begin() as s:
            yield s

    # -- events ---------------------------------------------------------------------------------------

    def add_event(
        self,
        kind: str,
        *,
        actor: str = "node",
        instance_id: int | None = None,
        study_id: int | None = None,
        association_id: int | None = None,
        detail: dict[str, Any] | None = None,
    ) -> int:
        with self.session() as s:
            return _event(
                s,
                kind,
                actor=actor,
                instance_id=instance_id,
                study_id=study_id,
                association_id=association_id,
                detail=detail,
            )

    def list_events(
        self,
        *,
        since: datetime | None = None,
        kinds: Sequence[str] = (),
        calling_ae: str | None = None,
        instance_id: int | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        q = select(Event).order_by(Event.id)
        if since is not None:
            q = q.where(Event.at >= since)
        if kinds:
            q = q.where(Event.kind.in_(kinds))
        if instance_id is not None:
            q = q.where(Event.instance_id == instance_id)
        if calling_ae is not None:
            # Events about an association from this AE, or about its instances, or naming it in the detail.
            q = (
                q.outerjoin(Association, Event.association_id == Association.id)
                .outerjoin(Instance, Event.instance_id == Instance.id)
                .where(or_(Association.calling_ae == calling_ae, Instance.calling_ae == calling_ae))
            )
        if limit is not None:
            q = q.limit(limit)
        with self.session() as s:
            return list(s.scalars(q))

    # -- associations ---------------------------------------------------------------------------------

    def record_association(
        self,
        *,
        calling_ae: str,
        called_ae: str,
        peer_host: str = "",
        peer_port: int | None = None,
        result: str,
        reason: str = "",
        tls: bool = False,
        direction: str = "inbound",
        protocol: str = "dicom",
    ) -> int:
        """Record an association request (or a STOW-RS request: `protocol` "stow-rs") and its outcome
        (accepted/rejected); returns its id."""
        with self.session() as s:
            row = Association(
                calling_ae=calling_ae,
                called_ae=called_ae,
                peer_host=peer_host,
                peer_port=peer_port,
                result=result,
                reason=reason,
                tls=tls,
                direction=direction,
                protocol=protocol,
            )
            if result == "rejected":
                row.ended_at = row.started_at = utcnow()
            s.add(row)
            s.flush()
            _event(
                s,
                f"association.{result}",
                association_id=row.id,
                detail={
                    "calling_ae": calling_ae,
                    "called_ae": called_ae,
                    "peer": f"{peer_host}:{peer_port}",
                    "reason": reason,
                    "direction": direction,
                    **({"protocol": protocol} if protocol != "dicom" else {}),
                },
            )
            return row.id

    def end_association(
        self, association_id: int, result: str, *, stored: int = 0, duplicate: int = 0, failed: int = 0
    ) -> None:
        """Close an accepted association (released/aborted) with the counts of what it brought."""
        with self.session() as s:
            row = _get(s, Association, association_id)
            row.result, row.ended_at = result, utcnow()
            row.instances_stored, row.instances_duplicate, row.instances_failed = stored, duplicate, failed
            _event(
                s,
                f"association.{result}",
                association_id=association_id,
                detail={"stored": stored, "duplicate": duplicate, "failed": failed},
            )

    def get_association(self, association_id: int) -> Association:
        with self.session() as s:
            return _get(s, Association, association_id)

    def list_associations(
        self, *, since: datetime | None = None, calling_ae: str | None = None, limit: int | None = None
    ) -> list[Association]:
        q = select(Association).order_by(Association.id)
        if since is not None:
            q = q.where(Association.started_at >= since)
        if calling_ae is not None:
            q = q.where(Association.calling_ae == calling_ae)
        if limit is not None:
            q = q.limit(limit)
        with self.session() as s:
            return list(s.scalars(q))

    # -- instances ------------------------------------------------------------------------------------

    def find_live_instance(self, sop_instance_uid: str) -> Instance | None:
        """The stored (non-duplicate, non-rejected) row for this SOP Instance UID, if any."""
        with self.session() as s:
            return s.scalar(_live(sop_instance_uid))

    def record_instance_received(self, info: ReceivedInstance, route: RouteOutcome | None = None) -> Instance:
        """Commit a newly spooled instance; raises DuplicateInstance on a race.

        With `route` (the routing decision, made before the commit) the row is written straight in
        its routed state (``queued`` or ``skipped``) with both events, in ONE transaction: one commit
        per received instance on the C-STORE hot path instead of two. Without it the row is
        ``received`` and routing follows (resume does that after a crash).
        """
        try:
            with self.session() as s:
                study = _upsert_study(s, info) if info.study_instance_uid else None
                row = _instance_row(info, study, InstanceState.RECEIVED)
                s.add(row)
                s.flush()
                _event(
                    s,
                    "instance.received",
                    instance_id=row.id,
                    study_id=row.study_id,
                    association_id=info.association_id,
                    detail={"sop_instance_uid": info.sop_instance_uid, "size": info.size_bytes}
                    | ({"warning": info.warning} if info.warning else {}),
                )
                if route is not None:
                    _apply_route(s, row, route)
                return row
        except IntegrityError as e:
            if self.find_live_instance(info.sop_instance_uid) is not None:
                raise DuplicateInstance(info.sop_instance_uid) from e
            raise

    def record_duplicate(self, info: ReceivedInstance, original_id: int) -> Instance:
        """A second copy of a stored instance: answered with success, recorded, not processed."""
        with self.session() as s:
            original = _get(s, Instance, original_id)
            row = _instance_row(info, None, InstanceState.DUPLICATE)
            row.study_id, row.duplicate_of_id = original.study_id, original_id
            row.reason = f"duplicate of instance {original_id}"
            row.finished_at = row.received_at
            s.add(row)
            s.flush()
            _event(
                s,
                "instance.duplicate",
                instance_id=row.id,
                study_id=row.study_id,
                association_id=info.association_id,
                detail={"sop_instance_uid": info.sop_instance_uid, "original_id": original_id},
            )
            return row

    def record_rejected(
        self,
        info: ReceivedInstance,
        *,
        status: int,
        reason: str,
        quarantine_path: str,
        conflict_with: int | None = None,
    ) -> Instance:
        """An instance refused at ingest (failure status sent); its bytes are in quarantine.

        With `conflict_with`: another data set under the SOP Instance UID of that stored instance
        (``instance.conflict``; the row points at the stored one, which stays as it is)."""
        with self.session() as s:
            row = _instance_row(info, None, InstanceState.REJECTED)
            row.reason, row.quarantine_path, row.finished_at = reason, quarantine_path, row.received_at
            if conflict_with is not None:
                original = _get(s, Instance, conflict_with)
                row.study_id, row.duplicate_of_id = original.study_id, conflict_with
            s.add(row)
            s.flush()
            _event(
                s,
                "instance.conflict" if conflict_with is not None else "instance.rejected",
                instance_id=row.id,
                study_id=row.study_id,
                association_id=info.association_id,
                detail={
                    "sop_instance_uid": info.sop_instance_uid,
                    "status": f"0x{status:04X}",
                    "reason": reason,
                    "quarantine": quarantine_path,
                    **({"stored_instance_id": conflict_with} if conflict_with is not None else {}),
                },
            )
            return row

    def set_instance_state(
        self,
        instance_id: int,
        state: InstanceState | str,
        reason: str | None = None,
        *,
        actor: str = "node",
        rule: str | None = None,
        models: Sequence[str] | None = None,
        destinations: Sequence[str] | None = None,
        detail: dict[str, Any] | None = None,
    ) -> Instance:
        """Move an instance along the state machine, fill the stage timestamp, append an event."""
        with self.session() as s:
            row = _locked_instance(s, instance_id)
            if rule is not None:
                row.rule = rule
            if models is not None:
                row.models = list(models)
            if destinations is not None:
                row.destinations = list(destinations)
            _transition(
                s,
                row,
                InstanceState(state),
                reason,
                actor=actor,
                detail={**({"rule": rule} if rule else {}), **(detail or {})},
            )
            return row

    def get_instance(self, instance_id: int) -> Instance:
        with self.session() as s:
            return _get(s, Instance, instance_id)

    def list_instances(self, filters: InstanceFilter | None = None) -> list[Instance]:
        f = filters or InstanceFilter()
        q: Select[Instance] = select(Instance).order_by(Instance.id)
        if f.states:
            q = q.where(Instance.state.in_([str(x) for x in f.states]))
        if f.calling_ae is not None:
            q = q.where(Instance.calling_ae == f.calling_ae)
        if f.since is not None:
            q = q.where(Instance.received_at >= f.since)
        if f.until is not None:
            q = q.where(Instance.received_at < f.until)
        if f.sop_instance_uid is not None:
            q = q.where(Instance.sop_instance_uid == f.sop_instance_uid)
        if f.node is not None:
            q = q.where(Instance.node == f.node)
        if f.study_instance_uid is not None:
            q = q.join(Study).where(Study.study_instance_uid == f.study_instance_uid)
        if f.limit is not None:
            q = q.limit(f.limit)
        with self.session() as s:
            return list(s.scalars(q))

    def pending_instances(self, *, own: bool = False) -> list[Instance]:
        """Instances not in a final state (what a restart must resume), oldest first; with `own`, only
        this node's (another node's spool files are not here)."""
        return self.list_instances(InstanceFilter(states=sorted(PENDING_STATES), node=self.node if own else None))

    def adopt_local_rows(self, holds: Callable[[str], bool]) -> int:
        """Give this node the rows written before node identity existed (``node = ''``) whose files it
        holds (`holds(path)`: the spool or quarantine file is on this node's disk), and their exports.
        Rows already named stay with their node: ownership never moves while that node may be alive."""
        with self.session() as s:
            rows = s.execute(
                select(Instance.id, Instance.spool_path, Instance.quarantine_path).where(Instance.node == "")
            ).all()
            mine = [
                i for i, spool, quarantine in rows if (spool and holds(spool)) or (quarantine and holds(quarantine))
            ]
            for start in range(0, len(mine), 500):
                chunk = mine[start : start + 500]
                s.execute(update(Instance).where(Instance.id.in_(chunk)).values(node=self.node))
                s.execute(
                    update(Export).where(Export.instance_id.in_(chunk)).where(Export.node == "").values(node=self.node)
                )
            s.execute(
                update(Study)
                .where(Study.node == "")
                .where(Study.id.in_(select(Instance.study_id).where(Instance.node == self.node)))
                .values(node=self.node)
            )
            if mine:
                _event(s, "node.adopted", detail={"instances": len(mine)})
            return len(mine)

    # -- studies --------------------------------------------------------------------------------------

    def list_studies(
        self,
        *,
        since: datetime | None = None,
        calling_ae: str | None = None,
        state: str | None = None,
        limit: int | None = None,
    ) -> list[StudySummary]:
        q = select(Study).order_by(Study.first_received_at, Study.id)
        if since is not None:
            q = q.where(Study.last_received_at >= since)
        if calling_ae is not None:
            q = q.where(Study.calling_ae == calling_ae)
        if state is not None:
            q = q.where(Study.id.in_(select(Instance.study_id).where(Instance.state == state)))
        if limit is not None:
            q = q.limit(limit)
        with self.session() as s:
            studies = list(s.scalars(q))
            counts, nodes = study_state_counts(s, [st.id for st in studies])
            return [StudySummary(st, counts.get(st.id, {}), nodes.get(st.id, [])) for st in studies]

    def get_study(self, study_instance_uid: str) -> Study | None:
        with self.session() as s:
            return s.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))

    # -- analysis runs (job id = instance id + queued_at: see node.audit.models.job_id_for) --------------

    def record_job_geometry(self, job_id: str, geometry: dict[str, Any]) -> bool:
        """Keep with the instance where the model grid of run `job_id` lies on the source (written before
        the job is published, read by ``node.finish``); False, and nothing written, if the run is over."""
        instance_id, _ = parse_job_id(job_id)
        with self.session() as s:
            row = _locked_instance(s, instance_id)
            if row.state != InstanceState.QUEUED or row.job_id != job_id:
                return False
            row.prepared_geometry = {**geometry, "job_id": job_id}
            return True

    def record_prepare_error(self, job_id: str, error: str, *, max_attempts: int) -> Instance | None:
        """One failed attempt to prepare run `job_id` (``analysis.prepare_error``); at the
        `max_attempts`-th the instance becomes ``failed`` with the error, in the same transaction.
        None when the run is over (stale: nothing recorded)."""
        instance_id, _ = parse_job_id(job_id)
        with self.session() as s:
            row = _locked_instance(s, instance_id)
            if row.state != InstanceState.QUEUED or row.job_id != job_id:
                return None
            earlier = s.scalars(
                select(Event).where(Event.instance_id == instance_id).where(Event.kind == "analysis.prepare_error")
            )
            attempt = 1 + sum(1 for e in earlier if (e.detail or {}).get("job_id") == job_id)
            _event(
                s,
                "analysis.prepare_error",
                instance_id=instance_id,
                study_id=row.study_id,
                detail={"job_id": job_id, "attempt": attempt, "max_attempts": max_attempts, "error": error},
            )
            if attempt >= max_attempts:
                _transition(
                    s,
                    row,
                    InstanceState.FAILED,
                    f"cannot prepare pixels after {attempt} attempts: {error}",
                    detail={"job_id": job_id},
                )
            return row

    def record_analysis(
        self,
        job_id: str,
        *,
        exports: Sequence[NewExport],
        files: dict[str, str],
        detail: dict[str, Any] | None = None,
        nothing_to_send: str = "",
    ) -> Instance | None:
        """Record the results of analysis run `job_id` in ONE transaction; None when the result is stale.

        The instance must still be ``queued`` for this very run (a re-run or a second delivery of the
        same result is stale: an event says so and nothing else changes). Then the result files are
        noted in the ``instance.analyzed`` event, each export not registered yet is created, and the
        instance becomes ``analyzed``, or ``exported`` at once with the reason `nothing_to_send` when
        there is nothing to export. A crash anywhere leaves the instance ``queued`` with no exports.
        """
        instance_id, _ = parse_job_id(job_id)
        with self.session() as s:
            row = _locked_instance(s, instance_id)
            if _stale(s, row, job_id):
                return None
            registered = {
                (e.destination_ae, e.file_path)
                for e in s.scalars(select(Export).where(Export.instance_id == instance_id))
            }
            for export in exports:
                if (export.destination_ae, export.file_path) not in registered:
                    _add_export(s, instance_id, export)
            _transition(s, row, InstanceState.ANALYZED, detail={**(detail or {}), "files": files})
            if not exports:
                _transition(s, row, InstanceState.EXPORTED, nothing_to_send or "nothing to send")
            return row

    def record_failed_analysis(self, job_id: str, reason: str) -> Instance | None:
        """Run `job_id` failed for good: the instance becomes ``failed``, unless the result is stale (None)."""
        instance_id, _ = parse_job_id(job_id)
        with self.session() as s:
            row = _locked_instance(s, instance_id)
            if _stale(s, row, job_id):
                return None
            _transition(s, row, InstanceState.FAILED, reason, detail={"job_id": job_id})
            return row

    def record_stale_result(self, job_id: str) -> None:
        """Audit a result that belongs to no current run (``analysis.stale_result``), change nothing else."""
        instance_id, _ = parse_job_id(job_id)
        with self.session() as s:
            _stale(s, _get(s, Instance, instance_id), job_id, force=True)


def study_state_counts(s: Session, study_ids: Sequence[int]) -> tuple[dict[int, dict[str, int]], dict[int, list[str]]]:
    """Instances per state of each study ({study id: {state: count}}) and the nodes that received its
    kept instances ({study id: sorted names}); studies without instances are left out."""
    counts: dict[int, dict[str, int]] = {}
    nodes: dict[int, set[str]] = {}
    if study_ids:
        rows = s.execute(
            select(Instance.study_id, Instance.state, Instance.node, func.count())
            .where(Instance.study_id.in_(list(study_ids)))
            .group_by(Instance.study_id, Instance.state, Instance.node)
        )
        for study_id, state, node, n in rows:
            if study_id is not None:
                per_state = counts.setdefault(study_id, {})
                per_state[state] = per_state.get(state, 0) + n
                if node and state not in (InstanceState.DUPLICATE, InstanceState.REJECTED):
                    nodes.setdefault(study_id, set()).add(node)
    return counts, {study_id: sorted(names) for study_id, names in nodes.items()}


def _stamp_node(s: Session, _context: Any, _instances: Any) -> None:
    """before_flush: new rows that record a node get this session's node name, whoever built them."""
    node = s.info.get("node", "")
    if not node:
        return
    for obj in s.new:
        if isinstance(obj, Study | Instance | Export | Event) and not obj.node:
            obj.node = node


def _live(sop_instance_uid: str) -> Select[Instance]:
    return (
        select(Instance)
        .where(Instance.sop_instance_uid == sop_instance_uid)
        .where(Instance.state.not_in([InstanceState.DUPLICATE, InstanceState.REJECTED]))
    )


def _upsert_study(s: Session, info: ReceivedInstance) -> Study:
    study = s.scalar(select(Study).where(Study.study_instance_uid == info.study_instance_uid))
    now = utcnow()
    if study is None:
        study = Study(
            study_instance_uid=info.study_instance_uid,
            patient_id=info.patient_id[:64],
            accession_number=info.accession_number[:16],
            study_date=info.study_date[:8],
            calling_ae=info.calling_ae,
            first_received_at=now,
            last_received_at=now,
        )
        s.add(study)
        s.flush()
    else:
        study.last_received_at = now
    return study


@dataclass(frozen=True)
class RouteOutcome:
    """Where routing sent a just-received instance: ``queued`` (with models/destinations) or ``skipped``."""

    state: InstanceState
    rule: str = ""
    reason: str = ""
    models: Sequence[str] = ()
    destinations: Sequence[str] = ()


def _apply_route(s: Session, row: Instance, route: RouteOutcome) -> None:
    if route.state not in TRANSITIONS[InstanceState.RECEIVED]:
        raise StoreError(f"received -> {route.state} is not a routing outcome")
    now = utcnow()
    row.state, row.rule, row.reason = route.state, route.rule, route.reason
    row.models, row.destinations = list(route.models), list(route.destinations)
    if route.state in STATE_TIMESTAMP:
        setattr(row, STATE_TIMESTAMP[route.state], now)
    row.finished_at = now if route.state in FINAL_STATES else None
    _event(
        s,
        f"instance.{route.state}",
        instance_id=row.id,
        study_id=row.study_id,
        detail={
            "from": str(InstanceState.RECEIVED),
            **({"reason": route.reason} if route.reason else {}),
            **({"rule": route.rule} if route.rule else {}),
        },
    )


def _instance_row(info: ReceivedInstance, study: Study | None, state: InstanceState) -> Instance:
    return Instance(
        sop_instance_uid=info.sop_instance_uid,
        sop_class_uid=info.sop_class_uid,
        transfer_syntax_uid=info.transfer_syntax_uid,
        series_instance_uid=info.series_instance_uid,
        study_id=study.id if study else None,
        association_id=info.association_id,
        calling_ae=info.calling_ae,
        modality=info.modality,
        body_part=info.body_part,
        view_position=info.view_position,
        priority=info.priority,
        size_bytes=info.size_bytes,
        spool_path=info.spool_path,
        state=state,
        received_at=utcnow(),
        models=[],
        destinations=[],
    )
