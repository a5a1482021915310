"""Audit log tables (SQLAlchemy 2.0 typed models).

The schema is owned by the Alembic migrations in ``node/migrations``; these classes mirror them.
Readers (CLI, web console) may query these models directly; writers go through
:mod:`node.audit.store` so that every state change also appends an :class:`Event`.

Instance state machine::

    received ─▶ queued ─▶ analyzed ─▶ exported
        │          │          │
        └─▶ skipped └─▶ failed └─▶ dead        (plus: duplicate, rejected at ingest)

``received``  stored in the spool, not yet routed (resume routes it again)
``queued``    routed to analysis and handed off (resume hands it off again)
``analyzed``  results built, exports pending
``exported``  every export sent (final)
``skipped``   stored, routing decided not to analyse it; ``reason`` says why (final)
``duplicate`` the SOP Instance UID was already stored; nothing kept, ``duplicate_of_id`` points at the
              original (final)
``rejected``  refused at ingest with a failure status; raw bytes in quarantine (final)
``failed``    analysis or result building failed for good (final)
``dead``      results could not be delivered after all retries (final)
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(dt: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored as UTC), PostgreSQL aware ones: compare them as aware."""
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def job_id_for(instance_id: int, queued_at: datetime | None) -> str:
    """The id of one analysis run: `<instance id>.<queued_at in ms>`; a re-queue starts a new run."""
    stamp = int(as_utc(queued_at).timestamp() * 1000) if queued_at else 0
    return f"{instance_id}.{stamp}"


def parse_job_id(job_id: str) -> tuple[int, int]:
    """(instance id, queued_at stamp) of a job id made by :func:`job_id_for`."""
    instance, _, stamp = job_id.partition(".")
    return int(instance), int(stamp or 0)


class InstanceState(enum.StrEnum):
    RECEIVED = "received"
    QUEUED = "queued"
    ANALYZED = "analyzed"
    EXPORTED = "exported"
    SKIPPED = "skipped"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    FAILED = "failed"
    DEAD = "dead"


FINAL_STATES = frozenset(
    {
        InstanceState.EXPORTED,
        InstanceState.SKIPPED,
        InstanceState.DUPLICATE,
        InstanceState.REJECTED,
        InstanceState.FAILED,
        InstanceState.DEAD,
    }
)
PENDING_STATES = frozenset(set(InstanceState) - FINAL_STATES)

# Which per-stage timestamp column a state transition fills in.
STATE_TIMESTAMP = {
    InstanceState.RECEIVED: "received_at",
    InstanceState.QUEUED: "queued_at",
    InstanceState.ANALYZED: "analyzed_at",
    InstanceState.EXPORTED: "exported_at",
}


class ExportState(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"  # stored by the destination (final unless it takes storage commitment)
    COMMITTING = "committing"  # stored, storage commitment asked, no N-EVENT-REPORT yet
    COMMITTED = "committed"  # the destination accepted responsibility for it (final)
    DEAD = "dead"


#: Exports that are delivered for good: their instance may become ``exported``.
DELIVERED_EXPORT_STATES = frozenset({ExportState.SENT, ExportState.COMMITTED})


class CommitmentState(enum.StrEnum):
    PENDING = "pending"  # N-ACTION sent (or about to be), waiting for the N-EVENT-REPORT
    COMMITTED = "committed"  # every instance committed
    FAILED = "failed"  # the report named failures, or the N-ACTION was refused / could not be sent
    EXPIRED = "expired"  # no report within sender.commitment_timeout_s


class AERole(enum.StrEnum):
    SOURCE = "source"  # may send to the node
    DESTINATION = "destination"  # the node sends results to it
    BOTH = "both"


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSON,
        list[str]: JSON,
    }


class Association(Base):
    """One DICOM association, inbound (a peer sends to us) or outbound (we send results or C-ECHO)."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(primary_key=True)
    direction: Mapped[str] = mapped_column(String(8), default="inbound")  # inbound | outbound
    # dicom: a DICOM association; stow-rs: one STOW-RS request (calling_ae: the token's source)
    protocol: Mapped[str] = mapped_column(String(8), default="dicom")
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str] = mapped_column(String(64), default="")
    peer_port: Mapped[int | None]
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    result: Mapped[str] = mapped_column(String(16))  # accepted | rejected | released | aborted
    reason: Mapped[str] = mapped_column(Text, default="")
    started_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    ended_at: Mapped[datetime | None]
    instances_stored: Mapped[int] = mapped_column(Integer, default=0)
    instances_duplicate: Mapped[int] = mapped_column(Integer, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)


class Study(Base):
    """A study seen by the node; PHI kept to the identifiers an administrator needs to find it."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="", index=True)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The node that received its first image: it decides the study's triage and sends its alerts.
    node: Mapped[str] = mapped_column(String(64), default="", server_default="")

    instances: Mapped[list[Instance]] = relationship(back_populates="study", order_by="Instance.id")


class Instance(Base):
    """One received SOP instance and where it is in the state machine (see module docstring)."""

    __tablename__ = "instances"
    __table_args__ = (
        # One live row per SOP Instance UID; duplicates and ingest rejects may repeat it.
        Index(
            "uq_instances_sop_live",
            "sop_instance_uid",
            unique=True,
            sqlite_where=text("state NOT IN ('duplicate', 'rejected')"),
            postgresql_where=text("state NOT IN ('duplicate', 'rejected')"),
        ),
        Index("ix_instances_state", "state"),
        Index("ix_instances_node_state", "node", "state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64), default="")
    series_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"), index=True)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    body_part: Mapped[str] = mapped_column(String(64), default="")
    view_position: Mapped[str] = mapped_column(String(16), default="")
    priority: Mapped[int] = mapped_column(Integer, default=0)  # C-STORE Priority: 0 medium, 1 high, 2 low
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default=InstanceState.RECEIVED)
    reason: Mapped[str] = mapped_column(Text, default="")
    rule: Mapped[str] = mapped_column(String(64), default="")
    models: Mapped[list[str]] = mapped_column(default=list)
    destinations: Mapped[list[str]] = mapped_column(default=list)
    spool_path: Mapped[str] = mapped_column(Text, default="")
    # Where the model grid of the published run lies on the source (node.analysis.prepare.Geometry.to_json() plus
    # its "job_id"), so that node.finish need not decode the source again; NULL before a publish.
    prepared_geometry: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    quarantine_path: Mapped[str] = mapped_column(Text, default="")
    duplicate_of_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"))
    received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    queued_at: Mapped[datetime | None]
    analyzed_at: Mapped[datetime | None]
    exported_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]  # when any final state was reached
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # The node that received it and holds its spool file: only that node publishes, finishes, exports
    # and purges it (another node cannot read the file).
    node: Mapped[str] = mapped_column(String(64), default="", server_default="")

    study: Mapped[Study | None] = relationship(back_populates="instances")
    exports: Mapped[list[Export]] = relationship(back_populates="instance", order_by="Export.id")

    @property
    def job_id(self) -> str:
        """The current analysis run (see :func:`job_id_for`); results of any other run are stale."""
        return job_id_for(self.id, self.queued_at)


class Event(Base):
    """Append-only log of everything that happened: ingest, routing, admin changes, exports."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)  # e.g. instance.received, ae.added
    actor: Mapped[str] = mapped_column(String(64), default="node")  # node | cli:<user> | web:<user> | config
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"))
    instance_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"), index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    node: Mapped[str] = mapped_column(String(64), default="", server_default="")  # the node that wrote it


class AETitle(Base):
    """A known peer: sources may send to the node, destinations receive results."""

    __tablename__ = "ae_titles"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(16), unique=True)
    host: Mapped[str | None] = mapped_column(String(255))
    port: Mapped[int | None]
    role: Mapped[str] = mapped_column(String(16), default=AERole.BOTH)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    storage_commitment: Mapped[bool] = mapped_column(Boolean, default=False)
    description: Mapped[str] = mapped_column(Text, default="")
    # A STOW-RS destination: results are POSTed to `url` (…/studies) instead of C-STOREd to host:port.
    url: Mapped[str | None] = mapped_column(Text)
    auth: Mapped[str] = mapped_column(String(8), default="none")  # none | bearer | basic
    username: Mapped[str] = mapped_column(String(255), default="")  # basic
    secret: Mapped[str] = mapped_column(Text, default="")  # bearer token or basic password; never shown
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    @property
    def may_send(self) -> bool:
        return self.role in (AERole.SOURCE, AERole.BOTH)

    @property
    def stow(self) -> bool:
        """Reached by STOW-RS (it has a URL) rather than by a DICOM association."""
        return bool(self.url)

    @property
    def may_receive(self) -> bool:
        reachable = self.stow or (self.host is not None and self.port is not None)
        return self.role in (AERole.DESTINATION, AERole.BOTH) and reachable


class StowToken(Base):
    """A bearer token a DICOMweb client presents to STOW-RS; `source` stands for its calling AE title
    (routing rules, reply-to-sender, the audit log). Only the token's SHA-256 is stored."""

    __tablename__ = "stow_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    source: Mapped[str] = mapped_column(String(16), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Export(Base):
    """One result object (SEG, SR, overlay) to deliver to one destination AE."""

    __tablename__ = "exports"
    __table_args__ = (Index("ix_exports_node_state", "node", "state"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    destination_ae: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(16))  # seg | sr | overlay
    file_path: Mapped[str] = mapped_column(Text)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(16), default=ExportState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    next_attempt_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]
    # The storage commitment transaction of the latest send (destinations that take commitment).
    commitment_id: Mapped[int | None] = mapped_column(ForeignKey("storage_commitments.id"), index=True)
    committed_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    node: Mapped[str] = mapped_column(String(64), default="", server_default="")  # holds the file, sends it

    instance: Mapped[Instance] = relationship(back_populates="exports")
    attempt_log: Mapped[list[ExportAttempt]] = relationship(back_populates="export", order_by="ExportAttempt.id")


class ExportAttempt(Base):
    """One try at sending an export (one C-STORE); kept for every try, successful or not."""

    __tablename__ = "export_attempts"

    id: Mapped[int] = mapped_column(primary_key=True)
    export_id: Mapped[int] = mapped_column(ForeignKey("exports.id"), index=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime] = mapped_column(default=utcnow)
    status: Mapped[int | None]  # DIMSE status from the peer; None when no response came
    error: Mapped[str] = mapped_column(Text, default="")

    export: Mapped[Export] = relationship(back_populates="attempt_log")


class StorageCommitment(Base):
    """One Storage Commitment Push Model transaction the node asked of a destination (node.export.commitment).

    Written in the same transaction that marks its exports ``committing``, before the N-ACTION goes
    out, so a node killed before the N-EVENT-REPORT finds it after a restart: a report that still
    comes settles it, else it expires at ``deadline_at`` and its exports are sent again.
    """

    __tablename__ = "storage_commitments"

    id: Mapped[int] = mapped_column(primary_key=True)
    transaction_uid: Mapped[str] = mapped_column(String(64), unique=True)
    destination_ae: Mapped[str] = mapped_column(String(16), index=True)
    state: Mapped[str] = mapped_column(String(16), default=CommitmentState.PENDING, index=True)
    # [{"export_id", "sop_class_uid", "sop_instance_uid"}]: what the N-ACTION asked to commit.
    sop_references: Mapped[list[Any]] = mapped_column(JSON, default=list)
    requested_at: Mapped[datetime] = mapped_column(default=utcnow)
    deadline_at: Mapped[datetime] = mapped_column(index=True)
    answered_at: Mapped[datetime | None]
    reason: Mapped[str] = mapped_column(Text, default="")


class TriageState(enum.StrEnum):
    DONE = "done"  # decided for the study as it stands (a late instance makes it due again)


class StudyTriage(Base):
    """The triage decision of one study (node.triage): level, why, and the findings it rests on.

    One row per study, rewritten when a late instance changes the decision (``revision`` + 1); every
    decision is also an ``triage.decided`` event with the same content, so the history stays in the log.
    ``patient_id``/``issuer_of_patient_id`` are kept here (from the source header) to find priors.
    """

    __tablename__ = "study_triage"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), unique=True)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    level: Mapped[str] = mapped_column(String(16), index=True)  # critical | urgent | routine
    reasons: Mapped[list[str]] = mapped_column(default=list)
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)  # node.triage.StudyResult.to_json()
    severity_score: Mapped[int | None]
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    # The instances the decision saw (ids), to tell when a late or re-analysed instance makes it stale.
    inputs: Mapped[list[str]] = mapped_column(default=list)
    decided_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    # The latest study summary SR issued (node.results.study_sr), which the next revision's replaces.
    report_series_uid: Mapped[str] = mapped_column(String(64), default="", server_default="")
    report_sop_uid: Mapped[str] = mapped_column(String(64), default="", server_default="")


class AlertState(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class Alert(Base):
    """One triage alert to one alert destination (HL7, FHIR, webhook); delivered like an export."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(primary_key=True)
    alert_id: Mapped[str] = mapped_column(String(64), unique=True)  # message control id, stable across retries
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # hl7 | fhir | webhook
    level: Mapped[str] = mapped_column(String(16))
    findings: Mapped[list[str]] = mapped_column(default=list)  # the triage rules it tells about
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)  # node.alerts.message.TriageAlert.to_json()
    state: Mapped[str] = mapped_column(String(16), default=AlertState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    receipt: Mapped[str] = mapped_column(Text, default="")
    next_attempt_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
