"""Read-only queries of the audit log for the console and the metrics collector.

Writers go through `node.audit.store`; these readers select from the models directly (as the
audit package allows) where the store has no matching filter (accession, study date, counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, or_, select

from node.audit.models import Event, Export, ExportState, Instance, InstanceState, Study
from node.audit.store import AuditStore, StudySummary, study_state_counts


def start_of_today() -> datetime:
    now = datetime.now(UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0)


def instance_counts(store: AuditStore) -> dict[str, int]:
    """Instances per current state (all time)."""
    with store.session() as s:
        rows = s.execute(select(Instance.state, func.count()).group_by(Instance.state))
        return {str(state): int(n) for state, n in rows}


def export_counts(store: AuditStore) -> dict[str, int]:
    with store.session() as s:
        rows = s.execute(select(Export.state, func.count()).group_by(Export.state))
        return {str(state): int(n) for state, n in rows}


def event_counts(store: AuditStore) -> dict[str, int]:
    """Events per kind since the audit log began (one indexed GROUP BY)."""
    with store.session() as s:
        rows = s.execute(select(Event.kind, func.count()).group_by(Event.kind))
        return {str(kind): int(n) for kind, n in rows}


def queued_count(store: AuditStore) -> int:
    """Instances handed to analysis and not analysed yet: the node's own view of the queue."""
    return instance_counts(store).get(InstanceState.QUEUED, 0)


@dataclass
class Today:
    received: int = 0
    analyzed: int = 0
    exported: int = 0
    failed: int = 0
    skipped: int = 0
    duplicate: int = 0
    rejected: int = 0
    dead_exports: int = 0
    committed_exports: int = 0  # results a destination took responsibility for (storage commitment)
    committing_exports: int = 0  # now: stored by a destination, its commitment report still awaited


def today(store: AuditStore, since: datetime | None = None) -> Today:
    """What happened since midnight UTC, counted from the append-only events (a re-run counts again)."""
    since = since or start_of_today()
    with store.session() as s:
        rows = dict(
            s.execute(
                select(Event.kind, func.count())
                .where(Event.at >= since)
                .where(Event.kind.like("instance.%") | Event.kind.like("export.%"))
                .group_by(Event.kind)
            )
            .tuples()
            .all()
        )
    return Today(
        received=rows.get("instance.received", 0),
        analyzed=rows.get("instance.analyzed", 0),
        exported=rows.get("instance.exported", 0),
        failed=rows.get("instance.failed", 0),
        skipped=rows.get("instance.skipped", 0),
        duplicate=rows.get("instance.duplicate", 0),
        rejected=rows.get("instance.rejected", 0),
        dead_exports=rows.get("export.dead", 0),
        committed_exports=rows.get("export.committed", 0),
        committing_exports=export_counts(store).get(ExportState.COMMITTING, 0),
    )


@dataclass(frozen=True)
class StudySearch:
    date_from: str = ""  # YYYY-MM-DD, on the day the node first received the study (UTC)
    date_to: str = ""
    calling_ae: str = ""
    state: str = ""
    accession: str = ""
    text: str = ""  # part of the Study Instance UID or the accession number
    limit: int = 200


def _day(value: str, end: bool = False) -> datetime | None:
    if not value:
        return None
    day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    return day + timedelta(days=1) if end else day


def search_studies(store: AuditStore, q: StudySearch) -> list[StudySummary]:
    """Newest first. Raises ValueError for a malformed date."""
    stmt = select(Study).order_by(Study.last_received_at.desc(), Study.id.desc()).limit(q.limit)
    if (start := _day(q.date_from)) is not None:
        stmt = stmt.where(Study.last_received_at >= start)
    if (end := _day(q.date_to, end=True)) is not None:
        stmt = stmt.where(Study.first_received_at < end)
    if q.calling_ae:
        stmt = stmt.where(Study.calling_ae == q.calling_ae.strip())
    if q.accession:
        stmt = stmt.where(Study.accession_number == q.accession.strip())
    if q.text:
        like = f"%{q.text.strip()}%"
        stmt = stmt.where(or_(Study.study_instance_uid.like(like), Study.accession_number.like(like)))
    if q.state:
        stmt = stmt.where(Study.id.in_(select(Instance.study_id).where(Instance.state == q.state)))
    with store.session() as s:
        studies = list(s.scalars(stmt))
        counts, nodes = study_state_counts(s, [st.id for st in studies])
    return [StudySummary(st, counts.get(st.id, {}), nodes.get(st.id, [])) for st in studies]


@dataclass
class StudyDetail:
    study: Study
    instances: list[Instance]
    exports: dict[int, list[Export]]
    events: list[Event]


def study_detail(store: AuditStore, study_id: int) -> StudyDetail | None:
    with store.session() as s:
        study = s.get(Study, study_id)
        if study is None:
            return None
        instances = list(s.scalars(select(Instance).where(Instance.study_id == study_id).order_by(Instance.id)))
        ids = [i.id for i in instances]
        exports: dict[int, list[Export]] = {}
        for e in s.scalars(select(Export).where(Export.instance_id.in_(ids)).order_by(Export.id)):
            exports.setdefault(e.instance_id, []).append(e)
        events = list(
            s.scalars(
                select(Event)
                .where(or_(Event.study_id == study_id, Event.instance_id.in_(ids)))
                .order_by(Event.at, Event.id)
            )
        )
    return StudyDetail(study, instances, exports, events)


def dead_exports(store: AuditStore) -> list[tuple[Export, Instance]]:
    with store.session() as s:
        rows = s.execute(
            select(Export, Instance)
            .join(Instance, Export.instance_id == Instance.id)
            .where(Export.state == ExportState.DEAD)
            .order_by(Export.id)
        )
        return [(e, i) for e, i in rows.tuples()]


def recent_events(store: AuditStore, limit: int = 50, prefix: str = "") -> list[Event]:
    stmt = select(Event).order_by(Event.id.desc()).limit(limit)
    if prefix:
        stmt = stmt.where(Event.kind.like(f"{prefix}%"))
    with store.session() as s:
        return list(s.scalars(stmt))
