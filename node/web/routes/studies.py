"""The dashboard, the study list and a study's page (results, triage, trend), its overlay, and the
re-run and re-send actions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from node.admin.service import AdminError
from node.audit import queries
from node.audit.store import StoreError
from node.runtime import metrics
from node.runtime.health import Readiness, disk_usage, queue_depth, readiness
from node.triage.worklist import alert_rows, patient_trend
from node.web.console import AdminForm, ConsoleDep, ViewerSession, back, render
from node.web.results_view import legend, safe_overlay, severity, sr_measurements
from workers.api import INFERENCE_QUEUE

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request, session: ViewerSession, console: ConsoleDep) -> HTMLResponse:
    store, settings = console.store, console.settings
    ready: Readiness = readiness(settings, store.engine, workers_probe=console.workers_probe)
    checks = {c.name: c for c in ready.checks}
    return render(
        request,
        "dashboard.html",
        session,
        today=queries.today(store),
        states=queries.instance_counts(store),
        ready=ready,
        checks=checks,
        queued=queries.queued_count(store),
        broker_depth=queue_depth(settings.broker_url, INFERENCE_QUEUE),
        disk=disk_usage(settings.storage.data_dir),
        events=queries.recent_events(store, limit=15),
    )


@router.get("/studies", response_class=HTMLResponse)
def studies(request: Request, session: ViewerSession, console: ConsoleDep) -> HTMLResponse:
    p = request.query_params
    search = queries.StudySearch(
        date_from=p.get("date_from", ""),
        date_to=p.get("date_to", ""),
        calling_ae=p.get("ae", ""),
        state=p.get("state", ""),
        accession=p.get("accession", ""),
        text=p.get("q", ""),
    )
    error = ""
    try:
        rows = queries.search_studies(console.store, search)
    except ValueError as e:
        rows, error = [], f"Dates are YYYY-MM-DD ({e})."
    return render(
        request,
        "studies.html",
        session,
        rows=rows,
        search=search,
        search_error=error,
        ae_names=[a.name for a in console.store.list_ae()],
    )


@router.get("/studies/{study_id}", response_class=HTMLResponse)
def study(request: Request, study_id: int, session: ViewerSession, console: ConsoleDep) -> HTMLResponse:
    store = console.store
    detail = queries.study_detail(store, study_id)
    if detail is None:
        return render(request, "not_found.html", session, status=404, what=f"study {study_id}")
    results: dict[int, dict[str, Any]] = {}
    for inst in detail.instances:
        exports = detail.exports.get(inst.id, [])
        seg = next((Path(e.file_path) for e in exports if e.kind == "seg" and Path(e.file_path).exists()), None)
        sr = next((Path(e.file_path) for e in exports if e.kind == "sr" and Path(e.file_path).exists()), None)
        measurements = sr_measurements(sr) if sr else []
        results[inst.id] = {
            "seg": seg,
            "sr": sr,
            "measurements": measurements,
            "severity": severity(measurements),
            "legend": legend(seg) if seg else [],
            "thumbnail": bool(inst.spool_path) and Path(inst.spool_path).exists(),
        }
    triage = store.get_triage(study_id)
    return render(
        request,
        "study.html",
        session,
        d=detail,
        results=results,
        triage=triage,
        alerts=alert_rows(store, study_id=study_id),
        trend=patient_trend(store, triage.patient_id) if triage else [],
    )


@router.get("/instances/{instance_id}/overlay.png")
def overlay(instance_id: int, _session: ViewerSession, console: ConsoleDep) -> Response:
    store = console.store
    try:
        inst = store.get_instance(instance_id)
    except StoreError:
        return Response(status_code=404)
    seg = next(
        (Path(e.file_path) for e in store.list_exports(instance_id) if e.kind == "seg" and Path(e.file_path).exists()),
        None,
    )
    png = safe_overlay(console.settings, Path(inst.spool_path), seg) if inst.spool_path else None
    if png is None:
        return Response(status_code=404)
    return Response(png, media_type="image/png")  # PHI: no-store, like the pages


@router.post("/instances/{instance_id}/rerun")
def rerun(instance_id: int, form: AdminForm, console: ConsoleDep) -> Response:
    try:
        msg = console.admin.rerun(instance_id, actor=form.actor)
    except AdminError as e:
        return back(form.get("back", "/studies"), err=str(e))
    metrics.count_web_action("rerun")
    return back(form.get("back", "/studies"), msg=msg)


@router.post("/instances/{instance_id}/resend")
def resend(instance_id: int, form: AdminForm, console: ConsoleDep) -> Response:
    try:
        msg = console.admin.resend(instance_id, actor=form.actor)
    except AdminError as e:
        return back(form.get("back", "/studies"), err=str(e))
    metrics.count_web_action("resend")
    return back(form.get("back", "/studies"), msg=msg)
