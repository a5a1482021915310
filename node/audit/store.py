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

from node.audit.db import make_engine, migrate
from node.audit.models import (
    DELIVERED_EXPORT_STATES,
    FINAL_STATES,
    PENDING_STATES,
    STATE_TIMESTAMP,
    AERole,
    AETitle,
    Association,
    CommitmentState,
    Event,
    Export,
    ExportAttempt,
    ExportState,
    Instance,
    InstanceState,
    StorageCommitment,
    StowToken,
    Study,
    parse_job_id,
    utcnow,
)
from node.audit.triage_store import TriageStoreMixin

log = logging.getLogger(__name__)
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


@dataclass(frozen=True)
class NewExport:
    """A result object to register for delivery: one file to one destination AE."""

    destination_ae: str
    kind: str  # seg | sr | overlay
    file_path: str
    sop_instance_uid: str = ""


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


class AuditStore(TriageStoreMixin):
    """Typed access to the audit log. Create with :meth:`open` (migrates) or from an engine.

    `node` is this process's node name (config ``node.name``): every study, instance, export and event
    it writes carries it (:func:`_stamp_node`), and the per-node queries (``own``) use it. Several
    nodes share one database; each acts only on its own rows (docs/operations.md, "Two nodes").
    """

    def __init__(self, engine: Engine, *, node: str = "") -> None:
        self.engine = engine
        self.node = node
        self._sessions = sessionmaker(engine, expire_on_commit=False, info={"node": node})
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

    # -- events ---------------------------------------------------------------------------------------

    def add_event(self, kind: str, *, actor: str = "node", instance_id: int | None = None,
                  study_id: int | None = None, association_id: int | None = None,
                  detail: dict[str, Any] | None = None) -> int:
        with self.session() as s:
            return _event(s, kind, actor=actor, instance_id=instance_id, study_id=study_id,
                          association_id=association_id, detail=detail)

    def list_events(self, *, since: datetime | None = None, kinds: Sequence[str] = (),
                    calling_ae: str | None = None, instance_id: int | None = None,
                    limit: int | None = None) -> list[Event]:
        q = select(Event).order_by(Event.id)
        if since is not None:
            q = q.where(Event.at >= since)
        if kinds:
            q = q.where(Event.kind.in_(kinds))
        if instance_id is not None:
            q = q.where(Event.instance_id == instance_id)
        if calling_ae is not None:
            # Events about an association from this AE, or about its instances, or naming it in the detail.
            q = q.outerjoin(Association, Event.association_id == Association.id).outerjoin(
                Instance, Event.instance_id == Instance.id).where(
                or_(Association.calling_ae == calling_ae, Instance.calling_ae == calling_ae))
        if limit is not None:
            q = q.limit(limit)
        with self.session() as s:
            return list(s.scalars(q))

    # -- associations ---------------------------------------------------------------------------------

    def record_association(self, *, calling_ae: str, called_ae: str, peer_host: str = "",
                           peer_port: int | None = None, result: str, reason: str = "",
                           tls: bool = False, direction: str = "inbound", protocol: str = "dicom") -> int:
        """Record an association request (or a STOW-RS request: `protocol` "stow-rs") and its outcome
        (accepted/rejected); returns its id."""
        with self.session() as s:
            row = Association(calling_ae=calling_ae, called_ae=called_ae, peer_host=peer_host,
                              peer_port=peer_port, result=result, reason=reason, tls=tls,
                              direction=direction, protocol=protocol)
            if result == "rejected":
                row.ended_at = row.started_at = utcnow()
            s.add(row)
            s.flush()
            _event(s, f"association.{result}", association_id=row.id,
                   detail={"calling_ae": calling_ae, "called_ae": called_ae, "peer": f"{peer_host}:{peer_port}",
                           "reason": reason, "direction": direction,
                           **({"protocol": protocol} if protocol != "dicom" else {})})
            return row.id

    def end_association(self, association_id: int, result: str, *, stored: int = 0, duplicate: int = 0,
                        failed: int = 0) -> None:
        """Close an accepted association (released/aborted) with the counts of what it brought."""
        with self.session() as s:
            row = _get(s, Association, association_id)
            row.result, row.ended_at = result, utcnow()
            row.instances_stored, row.instances_duplicate, row.instances_failed = stored, duplicate, failed
            _event(s, f"association.{result}", association_id=association_id,
                   detail={"stored": stored, "duplicate": duplicate, "failed": failed})

    def get_association(self, association_id: int) -> Association:
        with self.session() as s:
            return _get(s, Association, association_id)

    def list_associations(self, *, since: datetime | None = None, calling_ae: str | None = None,
                          limit: int | None = None) -> list[Association]:
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
                _event(s, "instance.received", instance_id=row.id, study_id=row.study_id,
                       association_id=info.association_id,
                       detail={"sop_instance_uid": info.sop_instance_uid, "size": info.size_bytes})
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
            _event(s, "instance.duplicate", instance_id=row.id, study_id=row.study_id,
                   association_id=info.association_id,
                   detail={"sop_instance_uid": info.sop_instance_uid, "original_id": original_id})
            return row

    def record_rejected(self, info: ReceivedInstance, *, status: int, reason: str, quarantine_path: str,
                        conflict_with: int | None = None) -> Instance:
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
            _event(s, "instance.conflict" if conflict_with is not None else "instance.rejected", instance_id=row.id,
                   study_id=row.study_id, association_id=info.association_id,
                   detail={"sop_instance_uid": info.sop_instance_uid, "status": f"0x{status:04X}",
                           "reason": reason, "quarantine": quarantine_path,
                           **({"stored_instance_id": conflict_with} if conflict_with is not None else {})})
            return row

    def set_instance_state(self, instance_id: int, state: InstanceState | str, reason: str | None = None, *,
                           actor: str = "node", rule: str | None = None, models: Sequence[str] | None = None,
                           destinations: Sequence[str] | None = None,
                           detail: dict[str, Any] | None = None) -> Instance:
        """Move an instance along the state machine, fill the stage timestamp, append an event."""
        with self.session() as s:
            row = _locked_instance(s, instance_id)
            if rule is not None:
                row.rule = rule
            if models is not None:
                row.models = list(models)
            if destinations is not None:
                row.destinations = list(destinations)
            _transition(s, row, InstanceState(state), reason, actor=actor,
                        detail={**({"rule": rule} if rule else {}), **(detail or {})})
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
            rows = s.execute(select(Instance.id, Instance.spool_path, Instance.quarantine_path)
                             .where(Instance.node == "")).all()
            mine = [i for i, spool, quarantine in rows
                    if (spool and holds(spool)) or (quarantine and holds(quarantine))]
            for start in range(0, len(mine), 500):
                chunk = mine[start:start + 500]
                s.execute(update(Instance).where(Instance.id.in_(chunk)).values(node=self.node))
                s.execute(update(Export).where(Export.instance_id.in_(chunk)).where(Export.node == "")
                          .values(node=self.node))
            s.execute(update(Study).where(Study.node == "").where(
                Study.id.in_(select(Instance.study_id).where(Instance.node == self.node))).values(node=self.node))
            if mine:
                _event(s, "node.adopted", detail={"instances": len(mine)})
            return len(mine)

    # -- studies --------------------------------------------------------------------------------------

    def list_studies(self, *, since: datetime | None = None, calling_ae: str | None = None,
                     state: str | None = None, limit: int | None = None) -> list[StudySummary]:
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

    # -- AE titles ------------------------------------------------------------------------------------

    def list_ae(self) -> list[AETitle]:
        with self.session() as s:
            return list(s.scalars(select(AETitle).order_by(AETitle.name)))

    def get_ae(self, name: str) -> AETitle | None:
        with self.session() as s:
            return s.scalar(select(AETitle).where(AETitle.name == name))

    def add_ae(self, name: str, *, host: str | None = None, port: int | None = None,
               role: AERole | str = AERole.BOTH, tls: bool = False, description: str = "",
               storage_commitment: bool = False, url: str | None = None, auth: str = "none", username: str = "",
               secret: str = "", actor: str = "cli") -> AETitle:
        """Add an AE title (already validated by the caller); StoreError if the name exists.

        With `url` it is a STOW-RS destination (`auth` none/bearer/basic with `username`/`secret`)."""
        try:
            with self.session() as s:
                row = AETitle(name=name, host=host, port=port, role=str(AERole(role)), tls=tls,
                              storage_commitment=storage_commitment, description=description, url=url or None,
                              auth=auth, username=username, secret=secret)
                s.add(row)
                s.flush()
                _event(s, "ae.added", actor=actor, detail=_ae_detail(row))
                return row
        except IntegrityError as e:
            raise StoreError(f"AE title {name!r} already exists") from e

    def update_ae(self, name: str, *, actor: str = "cli", **changes: Any) -> AETitle:
        """Change host/port/role/tls/storage_commitment/description (or a STOW-RS destination's
        url/auth/username/secret) of an AE title; the event records old and new values."""
        allowed = {"host", "port", "role", "tls", "storage_commitment", "description", "url", "auth", "username",
                   "secret"}
        if unknown := set(changes) - allowed:
            raise StoreError(f"cannot change {sorted(unknown)} of an AE title")
        with self.session() as s:
            row = s.scalar(select(AETitle).where(AETitle.name == name))
            if row is None:
                raise StoreError(f"no AE title {name!r}")
            before = _ae_detail(row)
            for key, value in changes.items():
                setattr(row, key, str(AERole(value)) if key == "role" else value)
            s.flush()
            _event(s, "ae.updated", actor=actor, detail={"before": before, "after": _ae_detail(row)})
            return row

    def remove_ae(self, name: str, *, actor: str = "cli") -> None:
        with self.session() as s:
            row = s.scalar(select(AETitle).where(AETitle.name == name))
            if row is None:
                raise StoreError(f"no AE title {name!r}")
            detail = _ae_detail(row)
            s.delete(row)
            _event(s, "ae.removed", actor=actor, detail=detail)

    def seed_ae(self, entries: Sequence[Any], *, actor: str = "config") -> int:
        """Add AE titles from config ``[[ae]]`` entries that the DB does not know yet; returns how many.

        Entries already in the DB are left alone: the DB is the administrator's live copy.
        """
        added = 0
        for e in entries:
            if self.get_ae(e.name) is None:
                try:
                    self.add_ae(e.name, host=e.host, port=e.port, role=e.role, tls=e.tls,
                                storage_commitment=e.storage_commitment, description=e.description, url=e.url,
                                auth=e.auth, username=e.username, secret=e.secret, actor=actor)
                    added += 1
                except StoreError:
                    pass  # another process seeded it first
        return added

    # -- STOW-RS tokens (node.dicomweb.tokens makes and checks them) --------------------------------------

    def add_stow_token(self, source: str, token_sha256: str, *, description: str = "",
                       actor: str = "cli") -> StowToken:
        with self.session() as s:
            row = StowToken(source=source, token_sha256=token_sha256, description=description)
            s.add(row)
            s.flush()
            _event(s, "stow_token.added", actor=actor,
                   detail={"id": row.id, "source": source, "description": description})
            return row

    def find_stow_token(self, token_sha256: str) -> StowToken | None:
        """The live (not revoked) token with this hash, if any."""
        with self.session() as s:
            return s.scalar(select(StowToken).where(StowToken.token_sha256 == token_sha256)
                            .where(StowToken.revoked_at.is_(None)))

    def list_stow_tokens(self, *, include_revoked: bool = False) -> list[StowToken]:
        q = select(StowToken).order_by(StowToken.source, StowToken.id)
        if not include_revoked:
            q = q.where(StowToken.revoked_at.is_(None))
        with self.session() as s:
            return list(s.scalars(q))

    def revoke_stow_token(self, token_id: int, *, actor: str = "cli") -> StowToken:
        with self.session() as s:
            row = s.get(StowToken, token_id, with_for_update=True)
            if row is None or row.revoked_at is not None:
                raise StoreError(f"no live STOW-RS token with id {token_id}")
            row.revoked_at = utcnow()
            _event(s, "stow_token.revoked", actor=actor, detail={"id": row.id, "source": row.source})
            return row

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
            earlier = s.scalars(select(Event).where(Event.instance_id == instance_id)
                                .where(Event.kind == "analysis.prepare_error"))
            attempt = 1 + sum(1 for e in earlier if (e.detail or {}).get("job_id") == job_id)
            _event(s, "analysis.prepare_error", instance_id=instance_id, study_id=row.study_id,
                   detail={"job_id": job_id, "attempt": attempt, "max_attempts": max_attempts, "error": error})
            if attempt >= max_attempts:
                _transition(s, row, InstanceState.FAILED,
                            f"cannot prepare pixels after {attempt} attempts: {error}", detail={"job_id": job_id})
            return row

    def record_analysis(self, job_id: str, *, exports: Sequence[NewExport], files: dict[str, str],
                        detail: dict[str, Any] | None = None, nothing_to_send: str = "") -> Instance | None:
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
            registered = {(e.destination_ae, e.file_path) for e in
                          s.scalars(select(Export).where(Export.instance_id == instance_id))}
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

    # -- exports --------------------------------------------------------------------------------------

    def create_export(self, instance_id: int, *, destination_ae: str, kind: str, file_path: str,
                      sop_instance_uid: str = "") -> Export:
        """Register a result object to deliver (state ``pending``, due now)."""
        with self.session() as s:
            return _add_export(s, instance_id, NewExport(destination_ae, kind, file_path, sop_instance_uid))

    def record_export_attempt(self, export_id: int, *, status: int | None, error: str = "",
                              succeeded: bool, next_attempt_at: datetime | None = None,
                              give_up: bool = False, association_id: int | None = None,
                              started_at: datetime | None = None,
                              on_settled: Callable[[Instance], None] | None = None) -> Export:
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
            s.add(ExportAttempt(export_id=export_id, association_id=association_id, started_at=started_at or now,
                                finished_at=now, status=status, error=error))
            row.attempts += 1
            row.last_error = "" if succeeded else error
            if succeeded:
                row.state, row.sent_at, row.next_attempt_at = ExportState.SENT, now, None
                row.commitment_id, row.committed_at = None, None  # no commitment asked for this send
            elif give_up:
                row.state, row.next_attempt_at = ExportState.DEAD, None
            else:
                row.next_attempt_at = next_attempt_at
            _event(s, f"export.{'sent' if succeeded else 'dead' if give_up else 'retry'}",
                   instance_id=row.instance_id,
                   detail={"export_id": export_id, "attempt": row.attempts, "destination": row.destination_ae,
                           "status": None if status is None else f"0x{status:04X}", "error": error,
                           **({"retry_at": next_attempt_at.isoformat()} if row.state == ExportState.PENDING
                              and next_attempt_at is not None else {})})
            settled = _settle(s, row.instance_id) if succeeded or give_up else None
        if settled is not None and on_settled is not None:
            on_settled(settled)
        return row

    def due_exports(self, now: datetime | None = None, limit: int = 100, *, own: bool = False) -> list[Export]:
        """Pending exports whose next attempt time has come; with `own`, only those whose files this
        node holds (each export is sent by its node alone: never twice, whichever node is up)."""
        when = now or utcnow()
        q = (select(Export).where(Export.state == ExportState.PENDING)
             .where(or_(Export.next_attempt_at.is_(None), Export.next_attempt_at <= when))
             .order_by(Export.next_attempt_at, Export.id).limit(limit))
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

    def requeue_exports(self, *, actor: str, export_ids: Sequence[int] | None = None,
                        instance_id: int | None = None, states: Sequence[ExportState] = (ExportState.DEAD,),
                        kind: str = "export.requeued") -> list[int]:
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
                _event(s, kind, actor=actor, instance_id=row.instance_id,
                       detail={"export_id": row.id, "from": previous, "destination": row.destination_ae,
                               "kind": row.kind})
                done.append(row.id)
        return done

    def purge_files(self, *, states: Sequence[InstanceState], finished_before: datetime, limit: int,
                    remove: Callable[[Instance], list[str]], detail: dict[str, Any]) -> int:
        """This node's instances in `states` finished before the cutoff that still have files: `remove(row)` deletes
        them (returns what it removed) while the rows are locked, then their paths are cleared, each
        with an `instance.purged` event, in the same transaction. Returns how many."""
        q = (select(Instance).where(Instance.state.in_([str(x) for x in states]))
             .where(Instance.finished_at < finished_before)
             .where(Instance.node == self.node)  # another node's files are on its disk
             .where(or_(Instance.spool_path != "", Instance.quarantine_path != ""))
             .order_by(Instance.id).limit(limit).with_for_update())
        n = 0
        with self.session() as s:
            for row in s.scalars(q).all():
                removed = remove(row)
                row.spool_path, row.quarantine_path = "", ""
                _event(s, "instance.purged", actor="retention", instance_id=row.id, study_id=row.study_id,
                       detail={**detail, "removed": removed})
                n += 1
        return n
    def result_objects(self, study_instance_uid: str) -> list[Export]:
        """One export row per result object (SEG, SR, overlay) the node made for a study, oldest first."""
        q = (select(Export).join(Instance, Export.instance_id == Instance.id).join(Study, Instance.study_id == Study.id)
             .where(Study.study_instance_uid == study_instance_uid).where(Export.sop_instance_uid != "")
             .order_by(Export.id))
        with self.session() as s:
            seen: dict[str, Export] = {}
            for row in s.scalars(q):
                seen.setdefault(row.sop_instance_uid, row)
            return list(seen.values())

    def list_export_attempts(self, export_id: int) -> list[ExportAttempt]:
        with self.session() as s:
            return list(s.scalars(select(ExportAttempt).where(ExportAttempt.export_id == export_id)
                                  .order_by(ExportAttempt.id)))

    # -- storage commitment (node.export.commitment) ------------------------------------------------------------

    def record_sent_for_commitment(self, sent: Sequence[tuple[int, int]], *, transaction_uid: str,
                                   destination_ae: str, references: Sequence[dict[str, Any]],
                                   deadline_at: datetime, started_at: datetime | None = None) -> StorageCommitment:
        """Exports a destination that takes storage commitment has stored ((export id, C-STORE status)):
        each gets its attempt row and becomes ``committing`` under one new commitment transaction
        (``pending`` until `deadline_at`), all in ONE transaction, written before the N-ACTION goes out."""
        with self.session() as s:
            now = utcnow()
            row = StorageCommitment(transaction_uid=transaction_uid, destination_ae=destination_ae,
                                    state=CommitmentState.PENDING, sop_references=list(references),
                                    requested_at=now, deadline_at=deadline_at, reason="")
            s.add(row)
            s.flush()
            for export_id, status in sent:
                export = s.get(Export, export_id, with_for_update=True)
                if export is None:
                    raise StoreError(f"no export with id {export_id}")
                s.add(ExportAttempt(export_id=export_id, started_at=started_at or now, finished_at=now,
                                    status=status, error=""))
                export.attempts += 1
                export.state, export.sent_at, export.next_attempt_at = ExportState.COMMITTING, now, None
                export.last_error, export.commitment_id, export.committed_at = "", row.id, None
                _event(s, "export.sent", instance_id=export.instance_id,
                       detail={"export_id": export_id, "attempt": export.attempts, "destination": destination_ae,
                               "status": f"0x{status:04X}", "error": "", "commitment": transaction_uid})
            _event(s, "commitment.opened", detail={"transaction_uid": transaction_uid, "destination": destination_ae,
                                                   "instances": len(references),
                                                   "deadline_at": deadline_at.isoformat(timespec="seconds")})
            return row

    def record_commitment_requested(self, transaction_uid: str, *, status: int) -> None:
        """The destination answered the N-ACTION with a success status: the report is awaited."""
        with self.session() as s:
            row = _commitment(s, transaction_uid)
            _event(s, "commitment.requested", detail={"transaction_uid": transaction_uid,
                                                      "destination": row.destination_ae,
                                                      "status": f"0x{status:04X}"})

    def record_commitment_report(self, transaction_uid: str, *, committed: Sequence[str],
                                 failed: dict[str, str], via: str, retry_at: RetryAt,
                                 on_settled: Callable[[Instance], None] | None = None) -> StorageCommitment | None:
        """An N-EVENT-REPORT for a commitment the node asked for. Committed instances' exports become
        ``committed``; failed ones, and any the report does not mention, are sent again (`retry_at`
        gives when, None: dead). A report for an unknown or already closed transaction is only audited;
        returns None then."""
        with self.session() as s:
            row = s.scalar(select(StorageCommitment).where(StorageCommitment.transaction_uid == transaction_uid)
                           .with_for_update())
            detail = {"transaction_uid": transaction_uid, "via": via, "committed": len(committed),
                      "failed": len(failed)}
            if row is None or row.state != CommitmentState.PENDING:
                kind = "commitment.unknown_report" if row is None else "commitment.late_report"
                _event(s, kind, detail={**detail, **({"state": row.state} if row is not None else {})})
                return None
            missing = "not named in the N-EVENT-REPORT"
            outcome = _close_commitment(s, row, set(committed), failed, missing, retry_at)
            row.state = CommitmentState.COMMITTED if not outcome.failed else CommitmentState.FAILED
            row.reason = "" if not outcome.failed else "; ".join(sorted({r for r in outcome.failed.values()}))[:500]
            _event(s, f"commitment.{row.state}", detail={**detail, "destination": row.destination_ae,
                                                         **({"reasons": row.reason} if row.reason else {})})
        for inst in outcome.settled:
            if on_settled is not None:
                on_settled(inst)
        return row

    def fail_commitment(self, transaction_uid: str, reason: str, *, retry_at: RetryAt,
                        expired: bool = False) -> StorageCommitment | None:
        """The N-ACTION failed, or no report came by the deadline (`expired`): every export of the
        transaction is sent again (or dead). None when the transaction is not pending any more."""
        with self.session() as s:
            row = s.scalar(select(StorageCommitment).where(StorageCommitment.transaction_uid == transaction_uid)
                           .with_for_update())
            if row is None or row.state != CommitmentState.PENDING:
                return None
            _close_commitment(s, row, set(), {}, reason, retry_at)
            row.state = CommitmentState.EXPIRED if expired else CommitmentState.FAILED
            row.reason = reason
            _event(s, f"commitment.{row.state}", detail={"transaction_uid": transaction_uid,
                                                         "destination": row.destination_ae, "reason": reason})
            return row

    def overdue_commitments(self, now: datetime | None = None) -> list[StorageCommitment]:
        """Pending commitments whose report deadline has passed (also those of a node that was down)."""
        q = (select(StorageCommitment).where(StorageCommitment.state == CommitmentState.PENDING)
             .where(StorageCommitment.deadline_at <= (now or utcnow())).order_by(StorageCommitment.id))
        with self.session() as s:
            return list(s.scalars(q))

    def list_commitments(self, *, destination_ae: str | None = None, state: str | None = None,
                         limit: int | None = None) -> list[StorageCommitment]:
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


def study_state_counts(s: Session, study_ids: Sequence[int]) -> tuple[dict[int, dict[str, int]],
                                                                     dict[int, list[str]]]:
    """Instances per state of each study ({study id: {state: count}}) and the nodes that received its
    kept instances ({study id: sorted names}); studies without instances are left out."""
    counts: dict[int, dict[str, int]] = {}
    nodes: dict[int, set[str]] = {}
    if study_ids:
        rows = s.execute(select(Instance.study_id, Instance.state, Instance.node, func.count())
                         .where(Instance.study_id.in_(list(study_ids)))
                         .group_by(Instance.study_id, Instance.state, Instance.node))
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


def _event(s: Session, kind: str, *, actor: str = "node", instance_id: int | None = None,
           study_id: int | None = None, association_id: int | None = None,
           detail: dict[str, Any] | None = None) -> int:
    row = Event(kind=kind, actor=actor, instance_id=instance_id, study_id=study_id,
                association_id=association_id, detail=detail or {})
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
    _event(s, "analysis.stale_result", instance_id=row.id, study_id=row.study_id,
           detail={"job_id": job_id, "state": str(row.state)})
    return True


def _transition(s: Session, row: Instance, new: InstanceState, reason: str | None = None, *, actor: str = "node",
                detail: dict[str, Any] | None = None) -> None:
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
    _event(s, f"instance.{new}", actor=actor, instance_id=row.id, study_id=row.study_id,
           detail={"from": str(old), **({"reason": reason} if reason else {}), **(detail or {})})


def _add_export(s: Session, instance_id: int, export: NewExport) -> Export:
    owner = s.get(Instance, instance_id)
    # Sent by the node that holds the instance (and so the result files built from its spool file).
    row = Export(instance_id=instance_id, destination_ae=export.destination_ae, kind=export.kind,
                 file_path=export.file_path, sop_instance_uid=export.sop_instance_uid, next_attempt_at=utcnow(),
                 node=owner.node if owner is not None and owner.node else s.info.get("node", ""))
    s.add(row)
    s.flush()
    _event(s, "export.created", instance_id=instance_id,
           detail={"export_id": row.id, "kind": export.kind, "destination": export.destination_ae})
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


#: When an export whose send was not committed goes out again, given its attempts so far (None: dead).
RetryAt = Callable[[int], datetime | None]


@dataclass
class _CommitmentOutcome:
    failed: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> reason
    settled: list[Instance] = field(default_factory=list)


def _commitment(s: Session, transaction_uid: str) -> StorageCommitment:
    row = s.scalar(select(StorageCommitment).where(StorageCommitment.transaction_uid == transaction_uid))
    if row is None:
        raise StoreError(f"no storage commitment {transaction_uid}")
    return row


def _close_commitment(s: Session, row: StorageCommitment, committed: set[str], failed: dict[str, str],
                      default_reason: str, retry_at: RetryAt) -> _CommitmentOutcome:
    """Settle the ``committing`` exports of `row`: committed, or sent again / dead with the reason."""
    outcome = _CommitmentOutcome()
    now = utcnow()
    uid_of = {int(r["export_id"]): str(r["sop_instance_uid"]) for r in row.sop_references}
    exports = s.scalars(select(Export).where(Export.commitment_id == row.id)
                        .where(Export.state == ExportState.COMMITTING).with_for_update())
    instances: set[int] = set()
    for export in exports:
        uid = uid_of.get(export.id, export.sop_instance_uid)
        detail: dict[str, Any] = {"export_id": export.id, "destination": export.destination_ae,
                                  "commitment": row.transaction_uid}
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
            _event(s, "export.dead" if when is None else "export.retry", instance_id=export.instance_id,
                   detail={**detail, "attempt": export.attempts, "error": export.last_error})
        instances.add(export.instance_id)
    for instance_id in sorted(instances):
        settled = _settle(s, instance_id)
        if settled is not None:
            outcome.settled.append(settled)
    return outcome


def _get(s: Session, model: type[_T], key: int) -> _T:
    row = s.get(model, key)
    if row is None:
        raise StoreError(f"no {model.__name__} with id {key}")
    return row


def _live(sop_instance_uid: str) -> Select[Instance]:
    return select(Instance).where(Instance.sop_instance_uid == sop_instance_uid).where(
        Instance.state.not_in([InstanceState.DUPLICATE, InstanceState.REJECTED]))


def _upsert_study(s: Session, info: ReceivedInstance) -> Study:
    study = s.scalar(select(Study).where(Study.study_instance_uid == info.study_instance_uid))
    now = utcnow()
    if study is None:
        study = Study(study_instance_uid=info.study_instance_uid, patient_id=info.patient_id[:64],
                      accession_number=info.accession_number[:16], study_date=info.study_date[:8],
                      calling_ae=info.calling_ae, first_received_at=now, last_received_at=now)
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
    _event(s, f"instance.{route.state}", instance_id=row.id, study_id=row.study_id,
           detail={"from": str(InstanceState.RECEIVED), **({"reason": route.reason} if route.reason else {}),
                   **({"rule": route.rule} if route.rule else {})})


def _instance_row(info: ReceivedInstance, study: Study | None, state: InstanceState) -> Instance:
    return Instance(
        sop_instance_uid=info.sop_instance_uid, sop_class_uid=info.sop_class_uid,
        transfer_syntax_uid=info.transfer_syntax_uid, series_instance_uid=info.series_instance_uid,
        study_id=study.id if study else None, association_id=info.association_id, calling_ae=info.calling_ae,
        modality=info.modality, body_part=info.body_part, view_position=info.view_position,
        priority=info.priority, size_bytes=info.size_bytes, spool_path=info.spool_path, state=state,
        received_at=utcnow(), models=[], destinations=[])


def _ae_detail(row: AETitle) -> dict[str, Any]:
    detail: dict[str, Any] = {"name": row.name, "host": row.host, "port": row.port, "role": row.role,
                              "tls": row.tls, "storage_commitment": row.storage_commitment,
                              "description": row.description}
    if row.url:  # a STOW-RS destination; its secret never goes to the log
        detail.update(url=row.url, auth=row.auth, username=row.username, secret_set=bool(row.secret))
    return detail
