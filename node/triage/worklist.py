"""The triage worklist as rows: one definition for the CLI (`cxrnode triage list`) and the console page."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from node.audit import AuditStore


def worklist_rows(
    store: AuditStore, *, levels: Sequence[str] = (), calling_ae: str | None = None, limit: int | None = 200
) -> list[dict[str, Any]]:
    """Decided studies, most pressing first, then newest; each with what set its level."""
    rows = []
    for r in store.list_triage(levels=levels, calling_ae=calling_ae, limit=limit):
        t, st, s = r.triage, r.study, r.triage.summary
        rows.append(
            {
                "study_id": st.id,
                "level": t.level,
                "revision": t.revision,
                "decided_at": t.decided_at,
                "last_received_at": st.last_received_at,
                "calling_ae": st.calling_ae,
                "accession": st.accession_number,
                "study_uid": st.study_instance_uid,
                "patient_id": t.patient_id,
                "severity": s.get("severity_score"),
                "change": s.get("severity_change"),
                "pneumothorax": s.get("pneumothorax_probability"),
                "images": s.get("images"),
                "triggered_by": ", ".join(s.get("fired") or []) or "-",
                "reasons": list(t.reasons),
                "experimental": bool(s.get("experimental")),
            }
        )
    return rows


def alert_rows(
    store: AuditStore, *, state: str | None = None, study_id: int | None = None, limit: int | None = 200
) -> list[dict[str, Any]]:
    return [
        {
            "id": a.id,
            "study_id": a.study_id,
            "destination": a.destination,
            "kind": a.kind,
            "level": a.level,
            "findings": ", ".join(a.findings),
            "state": a.state,
            "attempts": a.attempts,
            "next_attempt_at": a.next_attempt_at,
            "sent_at": a.sent_at,
            "receipt": a.receipt,
            "last_error": a.last_error,
            "alert_id": a.alert_id,
        }
        for a in store.list_alerts(state=state, study_id=study_id, limit=limit)
    ]


def patient_trend(store: AuditStore, patient_id: str) -> list[dict[str, Any]]:
    """Every decided study of one patient, oldest first: the severity trend the console draws."""
    rows = (
        [
            {
                "study_id": r.study.id,
                "study_date": r.triage.study_date,
                "study_uid": r.study.study_instance_uid,
                "severity": r.triage.severity_score,
                "level": r.triage.level,
            }
            for r in store.list_triage(patient_id=patient_id, limit=None)
        ]
        if patient_id
        else []
    )
    return sorted(rows, key=lambda r: (r["study_date"], r["study_id"]))
