"""AE titles: list, add, edit, remove, C-ECHO, all through node.admin (as `cxrnode ae` does)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from node.admin.service import AdminError
from node.audit import queries
from node.audit.models import AERole
from node.runtime import metrics
from node.web.console import AdminForm, ConsoleDep, Form, ViewerSession, back, render

router = APIRouter()


@router.get("/ae", response_class=HTMLResponse)
def ae_list(request: Request, session: ViewerSession, console: ConsoleDep) -> HTMLResponse:
    store = console.store
    edit = store.get_ae(request.query_params.get("edit", "")) if request.query_params.get("edit") else None
    echo_events = {e.detail.get("name"): e for e in reversed(queries.recent_events(store, 200, "ae.echo"))}
    return render(request, "ae.html", session, aes=store.list_ae(), edit=edit,
                  roles=[str(r) for r in AERole], echoes=echo_events)


def _ae_fields(form: Form) -> dict[str, Any]:
    """host/port/role/tls/storage_commitment/description as typed values; node.admin validates them like
    the configuration file."""
    port_text = form.get("port").strip()
    if port_text and not port_text.isdigit():
        raise AdminError(f"port: {port_text!r} is not a number")
    return {"host": form.get("host").strip() or None, "port": int(port_text) if port_text else None,
            "role": form.get("role", "both"), "tls": form.get("tls") == "on",
            "storage_commitment": form.get("storage_commitment") == "on",
            "description": form.get("description").strip()}


@router.post("/ae")
def ae_add(form: AdminForm, console: ConsoleDep) -> Response:
    try:
        added = console.admin.add_ae(form.get("name"), actor=form.actor, **_ae_fields(form))
    except AdminError as e:
        return back("/ae", err=str(e))
    metrics.count_web_action("ae_add")
    return back("/ae", msg=f"AE title {added.name} added")


@router.post("/ae/{name}")
def ae_update(name: str, form: AdminForm, console: ConsoleDep) -> Response:
    try:
        console.admin.update_ae(name, actor=form.actor, **_ae_fields(form))
    except AdminError as e:
        return back(f"/ae?edit={quote(name)}", err=str(e))
    metrics.count_web_action("ae_update")
    return back("/ae", msg=f"AE title {name} updated")


@router.post("/ae/{name}/remove")
def ae_remove(name: str, form: AdminForm, console: ConsoleDep) -> Response:
    try:
        console.admin.remove_ae(name, actor=form.actor)
    except AdminError as e:
        return back("/ae", err=str(e))
    metrics.count_web_action("ae_remove")
    return back("/ae", msg=f"AE title {name} removed")


@router.post("/ae/{name}/echo")
def ae_echo(name: str, form: AdminForm, console: ConsoleDep) -> Response:
    try:
        result = console.admin.echo_ae(name, actor=form.actor)
    except AdminError as e:
        return back("/ae", err=str(e))
    metrics.count_web_action("ae_echo")
    if result.ok:
        return back("/ae", msg=f"C-ECHO {name}: {result.detail} in {result.round_trip_ms:.0f} ms")
    return back("/ae", err=f"C-ECHO {name} failed: {result.detail}")
