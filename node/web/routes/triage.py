"""Console pages for triage: the worklist (studies by level, then time), alerts and their retry.

Rows come from :mod:`node.triage.worklist`, the same functions `cxrnode triage list` prints, and a
retry goes through :meth:`AuditStore.retry_alerts`, as `cxrnode alerts retry` does.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from node.alerts.message import TRIAGE_LEVELS
from node.runtime import metrics
from node.triage.worklist import alert_rows, worklist_rows
from node.web.console import AdminForm, ConsoleDep, ViewerSession, back, render

router = APIRouter()


@router.get("/worklist", response_class=HTMLResponse)
def worklist(request: Request, session: ViewerSession, console: ConsoleDep) -> HTMLResponse:
    store = console.store
    p = request.query_params
    level = p.get("level", "") if p.get("level", "") in TRIAGE_LEVELS else ""
    alert_state = p.get("alerts", "") if p.get("alerts", "") in ("pending", "sent", "dead") else ""
    ae = p.get("ae", "")
    rows = worklist_rows(store, levels=[level] if level else (), calling_ae=ae or None)
    alerts = alert_rows(store, limit=500)
    by_study: dict[int, list[dict[str, object]]] = {}
    for a in alerts:
        by_study.setdefault(int(a["study_id"]), []).append(a)
    if alert_state:
        rows = [r for r in rows if any(a["state"] == alert_state for a in by_study.get(r["study_id"], []))]
    return render(
        request,
        "worklist.html",
        session,
        rows=rows,
        alerts=by_study,
        levels=TRIAGE_LEVELS,
        level=level,
        alert_state=alert_state,
        ae=ae,
        ae_names=[a.name for a in store.list_ae()],
        counts=store.triage_level_counts(),
        dead_alerts=[a for a in alerts if a["state"] == "dead"],
        triage=console.settings.triage,
    )


@router.post("/alerts/{alert_id}/retry")
def alert_retry(alert_id: int, form: AdminForm, console: ConsoleDep) -> Response:
    n = console.store.retry_alerts([alert_id], actor=form.actor)
    metrics.count_web_action("alert_retry")
    return back(
        "/worklist", msg=f"alert {alert_id} due again" if n else "", err="" if n else f"alert {alert_id} is not dead"
    )
