"""The audit store's triage half: study decisions and the alerts they queue (writes and reads).

A mixin of :class:`node.audit.store.AuditStore`, kept apart only for size: the same rules hold
(every write one transaction, every change an event in it). A decision and the alerts it sends are
recorded together, so a crash never leaves a decided study without its alerts or an alert without
its decision; alerts are deduplicated there, under the study's row lock, so replicas or a re-run
never tell a destination the same finding twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import case, exists, func, or_, select
from sqlalchemy.orm import Session

from node.audit.models import (
    PENDING_STATES,
    Alert,
    AlertState,
    Event,
    Instance,
    InstanceState,
    Study,
    StudyTriage,
    utcnow,
)
from node.audit.txn import NewExport, _add_export, _event

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: Instance states whose analysis is over for now (a decision may be made on them).
_IGNORED_STATES = (InstanceState.DUPLICATE, InstanceState.REJECTED)


@dataclass(frozen=True)
class NewAlert:
    """An alert the decision wants sent; `findings` are the rule names (or the level) it tells about."""

    destination: str
    kind: str
    findings: tuple[str, ...]


@dataclass(frozen=True)
class NewStudyReport:
    """The study summary SR built for revision `revision` of a decision, and where to send it.

    Its exports belong to `instance_id` (an analysed image of the study on this node: retention and the
    console handle the report with that image's results). Recorded only if the decision is that revision.
    """

    revision: int
    instance_id: int
    series_instance_uid: str
    sop_instance_uid: str
    exports: Sequence[NewExport]


class TriageRecord(NamedTuple):
    """What :meth:`TriageStoreMixin.record_triage` did: the row, the alerts queued, whether the decision changed."""

    row: StudyTriage
    alerts: list[Alert]
    changed: bool


@dataclass(frozen=True)
class TriageRow:
    """A study's decision with the study identifiers (for listings)."""

    triage: StudyTriage
    study: Study


def is_new_decision(row: StudyTriage | None, level: str, reasons: Sequence[str], summary: dict[str, Any]) -> bool:
    """Whether a decision is a new revision of `row` (the study's current one): what it says changed."""
    return row is None or (row.level, list(row.reasons), row.summary) != (level, list(reasons), summary)


PayloadFactory = Callable[[int, str], dict[str, Any]]  # (revision, alert_id) -> TriageAlert JSON


class TriageStoreMixin:
    session: Callable[[], AbstractContextManager[Session]]
    node: str

    # -- decisions ---------------------------------------------------------------------------------------

    def triage_candidates(
        self, *, stable_s: float, max_age_s: float, now: datetime | None = None, limit: int = 50, own: bool = False
    ) -> list[int]:
        """Ids of studies to decide now: stable for `stable_s`, nothing left to analyse, and either never
        decided or changed since (a late instance, an instance analysed after the decision). With `own`,
        only studies this node owns (it received their first image): one node decides each study and
        sends its alerts, so two nodes sharing the database never alert twice."""
        now = now or utcnow()
        pending = exists().where(
            Instance.study_id == Study.id, Instance.state.in_(list(PENDING_STATES - {InstanceState.ANALYZED}))
        )
        newer = exists().where(Instance.study_id == Study.id, Instance.analyzed_at > StudyTriage.decided_at)
        q = (
            select(Study.id)
            .outerjoin(StudyTriage, StudyTriage.study_id == Study.id)
            .where(Study.last_received_at <= now - timedelta(seconds=stable_s))
            .where(Study.last_received_at >= now - timedelta(seconds=max_age_s))
            .where(~pending)
            .where(or_(StudyTriage.id.is_(None), StudyTriage.decided_at < Study.last_received_at, newer))
            .order_by(Study.last_received_at)
            .limit(limit)
        )
        if own:
            q = q.where(Study.node == self.node)
        with self.session() as s:
            return list(s.scalars(q))

    def triage_inputs(self, study_id: int) -> tuple[Study, list[Instance], dict[int, dict[str, Any]]]:
        """The study, its instances (duplicates and ingest rejects left out) and, per analysed instance,
        the detail of its latest ``instance.analyzed`` event (the worker's figures)."""
        with self.session() as s:
            study = s.get(Study, study_id)
            if study is None:
                raise LookupError(f"no study with id {study_id}")
            instances = list(
                s.scalars(
                    select(Instance)
                    .where(Instance.study_id == study_id)
                    .where(Instance.state.not_in(list(_IGNORED_STATES)))
                    .order_by(Instance.id)
                )
            )
            analysed = [i.id for i in instances if i.analyzed_at is not None]
            details: dict[int, dict[str, Any]] = {}
            if analysed:
                for ev in s.scalars(
                    select(Event)
                    .where(Event.kind == "instance.analyzed")
                    .where(Event.instance_id.in_(analysed))
                    .order_by(Event.id)
                ):
                    details[ev.instance_id or 0] = ev.detail  # the latest run wins
            return study, instances, details

    def find_prior(self, *, study_id: int, patient_id: str, issuer: str, study_date: str) -> StudyTriage | None:
        """The patient's most recent other decided study with a severity (same Patient ID and issuer),
        earlier than `study_date` when both dates are known."""
        if not patient_id:
            return None
        q = (
            select(StudyTriage)
            .where(StudyTriage.patient_id == patient_id[:64])
            .where(StudyTriage.issuer_of_patient_id == issuer[:64])
            .where(StudyTriage.study_id != study_id)
            .where(StudyTriage.severity_score.is_not(None))
        )
        if study_date:
            q = q.where(or_(StudyTriage.study_date == "", StudyTriage.study_date < study_date))
        q = q.order_by(StudyTriage.study_date.desc(), StudyTriage.decided_at.desc()).limit(1)
        with self.session() as s:
            return s.scalar(q)

    def record_triage(
        self,
        study_id: int,
        *,
        inputs: Sequence[str],
        level: str,
        reasons: Sequence[str],
        summary: dict[str, Any],
        severity_score: int | None,
        patient_id: str,
        issuer: str,
        study_date: str,
        alerts: Sequence[NewAlert],
        payload: PayloadFactory,
        report: NewStudyReport | None = None,
        actor: str = "node",
    ) -> TriageRecord:
        """Record a study's decision, queue its alerts and its summary report's exports in ONE transaction.

        An unchanged decision (same level, reasons and findings) only notes the new inputs; a changed
        one is a new revision, and `report` (built for that revision) is queued and becomes the one the
        next revision replaces. An alert is queued for a destination only for findings not already
        alerted to it for this study, so a late image never repeats an alert.
        """
        with self.session() as s:
            study = s.get(Study, study_id, with_for_update=True)
            if study is None:
                raise LookupError(f"no study with id {study_id}")
            row = s.scalar(select(StudyTriage).where(StudyTriage.study_id == study_id))
            changed = is_new_decision(row, level, reasons, summary)
            if row is None:
                row = StudyTriage(
                    study_id=study_id,
                    revision=1,
                    level=level,
                    reasons=list(reasons),
                    summary=summary,
                    severity_score=severity_score,
                    patient_id=patient_id[:64],
                    issuer_of_patient_id=issuer[:64],
                    study_date=study_date[:8],
                    inputs=list(inputs),
                )
                s.add(row)
            elif changed:
                row.revision += 1
            row.level, row.reasons, row.summary, row.severity_score = level, list(reasons), summary, severity_score
            row.patient_id, row.issuer_of_patient_id, row.study_date = patient_id[:64], issuer[:64], study_date[:8]
            row.inputs, row.decided_at = list(inputs), utcnow()
            s.flush()
            issued = changed and report is not None and report.revision == row.revision
            if issued and report is not None:
                for export in report.exports:
                    _add_export(s, report.instance_id, export)
                row.report_series_uid, row.report_sop_uid = report.series_instance_uid, report.sop_instance_uid
            if changed:
                _event(
                    s,
                    "triage.decided",
                    actor=actor,
                    study_id=study_id,
                    detail={
                        "revision": row.revision,
                        "level": level,
                        "reasons": list(reasons),
                        "inputs": list(inputs),
                        "summary": summary,
                        **({"report_sop_instance_uid": row.report_sop_uid} if issued else {}),
                    },
                )
            queued: list[Alert] = []
            for new in alerts:
                told = {
                    f
                    for a in s.scalars(
                        select(Alert).where(Alert.study_id == study_id).where(Alert.destination == new.destination)
                    )
                    for f in a.findings
                }
                if set(new.findings) <= told:
                    continue
                # 20 characters: HL7 2.5.1 MSH-10 (message control id) allows no more; 80 random bits.
                alert_id = uuid.uuid4().hex[:20]
                alert = Alert(
                    alert_id=alert_id,
                    study_id=study_id,
                    destination=new.destination,
                    kind=new.kind,
                    level=level,
                    findings=list(new.findings),
                    payload=payload(row.revision, alert_id),
                    state=AlertState.PENDING,
                    attempts=0,
                    next_attempt_at=utcnow(),
                )
                s.add(alert)
                s.flush()
                _event(
                    s,
                    "alert.created",
                    actor=actor,
                    study_id=study_id,
                    detail={
                        "alert": alert.id,
                        "alert_id": alert_id,
                        "destination": new.destination,
                        "kind": new.kind,
                        "level": level,
                        "findings": list(new.findings),
                    },
                )
                queued.append(alert)
            return TriageRecord(row, queued, changed)

    def reopen_later_studies(self, *, study_id: int, patient_id: str, issuer: str, study_date: str) -> list[int]:
        """A decision for an earlier study of a patient (a prior that arrived late, or was fetched) makes
        the patient's later decided studies due again, when it is a nearer prior than the one they used."""
        if not patient_id or not study_date:
            return []
        reopened = []
        with self.session() as s:
            rows = s.scalars(
                select(StudyTriage)
                .where(StudyTriage.patient_id == patient_id[:64])
                .where(StudyTriage.issuer_of_patient_id == issuer[:64])
                .where(StudyTriage.study_id != study_id)
                .where(StudyTriage.study_date > study_date)
            )
            for row in rows:
                prior = (row.summary or {}).get("prior") or {}
                if prior and str(prior.get("study_date") or "") >= study_date:
                    continue
                row.decided_at = EPOCH  # due again: the engine's candidates are decided before last receipt
                _event(
                    s,
                    "triage.reopened",
                    study_id=row.study_id,
                    detail={"reason": "an earlier study of the patient was decided", "prior_study_id": study_id},
                )
                reopened.append(row.study_id)
        return reopened

    def fetched_as_prior(self, study_instance_uid: str, *, within_days: float = 30.0) -> bool:
        """True when the node itself moved this study in as a prior (``priors.requested`` names it)."""
        since = utcnow() - timedelta(days=within_days)
        with self.session() as s:
            return any(
                (d or {}).get("moved") == study_instance_uid
                for d in s.scalars(
                    select(Event.detail).where(Event.kind == "priors.requested").where(Event.at >= since)
                )
            )

    def get_triage(self, study_id: int) -> StudyTriage | None:
        with self.session() as s:
            return s.scalar(select(StudyTriage).where(StudyTriage.study_id == study_id))

    def list_triage(
        self,
        *,
        levels: Sequence[str] = (),
        calling_ae: str | None = None,
        patient_id: str | None = None,
        limit: int | None = 200,
    ) -> list[TriageRow]:
        """Decided studies, most pressing level first, then newest first (the worklist order)."""
        rank = case({"critical": 0, "urgent": 1, "routine": 2}, value=StudyTriage.level, else_=3)
        q = select(StudyTriage, Study).join(Study, Study.id == StudyTriage.study_id)
        if levels:
            q = q.where(StudyTriage.level.in_(list(levels)))
        if calling_ae:
            q = q.where(Study.calling_ae == calling_ae)
        if patient_id is not None:
            q = q.where(StudyTriage.patient_id == patient_id)
        q = q.order_by(rank, Study.last_received_at.desc())
        if limit is not None:
            q = q.limit(limit)
        with self.session() as s:
            return [TriageRow(t, st) for t, st in s.execute(q).tuples()]

    def study_uid(self, study_id: int) -> str:
        with self.session() as s:
            return s.scalar(select(Study.study_instance_uid).where(Study.id == study_id)) or ""

    def alert_counts(self) -> dict[str, int]:
        with self.session() as s:
            return {
                str(state): int(n)
                for state, n in s.execute(select(Alert.state, func.count()).group_by(Alert.state)).tuples()
            }

    def triage_level_counts(self) -> dict[str, int]:
        with self.session() as s:
            return {
                str(level): int(n)
                for level, n in s.execute(select(StudyTriage.level, func.count()).group_by(StudyTriage.level)).tuples()
            }

    # -- alerts ------------------------------------------------------------------------------------------

    def due_alerts(self, now: datetime | None = None, limit: int = 100, *, own: bool = False) -> list[Alert]:
        """Pending alerts whose time has come; with `own`, only those of studies this node owns."""
        now = now or utcnow()
        q = (
            select(Alert)
            .where(Alert.state == AlertState.PENDING)
            .where(or_(Alert.next_attempt_at.is_(None), Alert.next_attempt_at <= now))
            .order_by(Alert.id)
            .limit(limit)
        )
        if own:
            q = q.where(Alert.study_id.in_(select(Study.id).where(Study.node == self.node)))
        with self.session() as s:
            return list(s.scalars(q))

    def record_alert_attempt(
        self,
        alert_pk: int,
        *,
        ok: bool,
        error: str = "",
        receipt: str = "",
        next_attempt_at: datetime | None = None,
        give_up: bool = False,
    ) -> Alert:
        """One delivery try: ``sent``, still ``pending`` (due again at `next_attempt_at`) or ``dead``."""
        with self.session() as s:
            row = s.get(Alert, alert_pk, with_for_update=True)
            if row is None:
                raise LookupError(f"no alert with id {alert_pk}")
            if row.state != AlertState.PENDING:  # sent meanwhile by another node, or retried by hand
                return row
            row.attempts += 1
            now = utcnow()
            if ok:
                row.state, row.sent_at, row.receipt, row.last_error = AlertState.SENT, now, receipt, ""
                row.next_attempt_at = None
                kind = "alert.sent"
            elif give_up:
                row.state, row.last_error, row.next_attempt_at = AlertState.DEAD, error, None
                kind = "alert.dead"
            else:
                row.last_error, row.next_attempt_at = error, next_attempt_at
                kind = "alert.failed"
            _event(
                s,
                kind,
                study_id=row.study_id,
                detail={
                    "alert": row.id,
                    "destination": row.destination,
                    "kind": row.kind,
                    "attempt": row.attempts,
                    **({"receipt": receipt} if ok else {"error": error}),
                    **(
                        {"next_attempt_at": next_attempt_at.isoformat()}
                        if next_attempt_at and not ok and not give_up
                        else {}
                    ),
                },
            )
            return row

    def retry_alerts(self, alert_pks: Sequence[int], *, actor: str) -> int:
        """Make dead alerts due now with a fresh attempt budget (history stays in the events)."""
        n = 0
        with self.session() as s:
            for pk in alert_pks:
                row = s.get(Alert, pk, with_for_update=True)
                if row is None or row.state != AlertState.DEAD:
                    continue
                row.state, row.attempts, row.next_attempt_at = AlertState.PENDING, 0, utcnow()
                _event(
                    s,
                    "alert.requeued",
                    actor=actor,
                    study_id=row.study_id,
                    detail={"alert": row.id, "destination": row.destination, "kind": row.kind},
                )
                n += 1
        return n

    def list_alerts(
        self, *, state: str | None = None, study_id: int | None = None, limit: int | None = 200
    ) -> list[Alert]:
        q = select(Alert).order_by(Alert.id.desc())
        if state:
            q = q.where(Alert.state == state)
        if study_id is not None:
            q = q.where(Alert.study_id == study_id)
        if limit is not None:
            q = q.limit(limit)
        with self.session() as s:
            return list(s.scalars(q))

    def alert_ids(self, *, state: str) -> list[int]:
        with self.session() as s:
            return list(s.scalars(select(Alert.id).where(Alert.state == state).order_by(Alert.id)))


__all__ = ["NewAlert", "PayloadFactory", "TriageRow", "TriageStoreMixin"]
