"""Read-only views of the configuration (rules, models) and the records (dead letter, audit events),
and the dead-letter retries."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from node.admin.service import AdminError
from node.audit import queries
from node.runtime import metrics
from node.web.console import AdminForm, ConsoleDep, ViewerSession, back, render
from workers import catalogue

router = APIRouter()


@router.get("/rules", response_class=HTMLResponse)
def rules(request: Request, session: ViewerSession, console: ConsoleDep) -> HTMLResponse:
    return render(request, "rules.html", session, rules=console.settings.rules, s=console.settings)


@router.get("/models", response_class=HTMLResponse)
def models(request: Request, session: ViewerSession, console: ConsoleDep) -> HTMLResponse:
    return render(
        request,
        "models.html",
        session,
        cards=catalogue.model_cards(console.weights_dir),
        enabled=console.settings.models,
        weights_dir=console.weights_dir,
    )


@router.get("/dead", response_class=HTMLResponse)
def dead(request: Request, session: ViewerSession, console: ConsoleDep) -> HTMLResponse:
    return render(request, "dead.html", session, rows=queries.dead_exports(console.store))


@router.post("/exports/{export_id}/retry")
def export_retry(export_id: int, form: AdminForm, console: ConsoleDep) -> Response:
    try:
        msg = console.admin.retry_exports([export_id], actor=form.actor)
    except AdminError as e:
        return back("/dead", err=str(e))
    metrics.count_web_action("export_retry")
    return back("/dead", msg=msg)


@router.post("/exports/retry-dead")
def export_retry_all(form: AdminForm, console: ConsoleDep) -> Response:
    try:
        msg = console.admin.retry_all_dead(actor=form.actor)
    except AdminError as e:
        return back("/dead", err=str(e))
    metrics.count_web_action("export_retry")
    return back("/dead", msg=msg)


@router.get("/events", response_class=HTMLResponse)
def events(request: Request, session: ViewerSession, console: ConsoleDep) -> HTMLResponse:
    prefix = request.query_params.get("kind", "")
    return render(
        request,
        "events.html",
        session,
        events=queries.recent_events(console.store, limit=300, prefix=prefix),
        kind=prefix,
    )
