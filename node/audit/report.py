"""Plain-dict views of the audit log for the CLI (table, JSON, CSV) and other readers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from node.audit.models import Event, Instance
from node.audit.store import StudySummary


def _iso(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else ""


def study_row(s: StudySummary) -> dict[str, Any]:
    st = s.study
    return {
        "study_instance_uid": st.study_instance_uid,
        "first_received": _iso(st.first_received_at),
        "last_received": _iso(st.last_received_at),
        "calling_ae": st.calling_ae,
        "patient_id": st.patient_id,
        "accession_number": st.accession_number,
        "study_date": st.study_date,
        "instances": s.instance_count,
        "nodes": ",".join(s.nodes),
        "triage_node": st.node,
        "states": " ".join(f"{k}={v}" for k, v in sorted(s.states.items())),
    }


def instance_row(i: Instance) -> dict[str, Any]:
    return {
        "id": i.id,
        "sop_instance_uid": i.sop_instance_uid,
        "sop_class_uid": i.sop_class_uid,
        "modality": i.modality,
        "body_part": i.body_part,
        "view_position": i.view_position,
        "calling_ae": i.calling_ae,
        "node": i.node,
        "state": i.state,
        "reason": i.reason,
        "rule": i.rule,
        "models": ",".join(i.models or []),
        "destinations": ",".join(i.destinations or []),
        "received_at": _iso(i.received_at),
        "queued_at": _iso(i.queued_at),
        "analyzed_at": _iso(i.analyzed_at),
        "exported_at": _iso(i.exported_at),
        "finished_at": _iso(i.finished_at),
        "spool_path": i.spool_path,
        "quarantine_path": i.quarantine_path,
    }


def event_row(e: Event) -> dict[str, Any]:
    return {
        "id": e.id,
        "at": _iso(e.at),
        "kind": e.kind,
        "actor": e.actor,
        "node": e.node,
        "association_id": e.association_id,
        "study_id": e.study_id,
        "instance_id": e.instance_id,
        "detail": e.detail,
    }
