"""AE titles: list, add, edit, remove, C-ECHO, all through node.admin (as `cxrnode ae` does)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from node.admin.service import AdminError
from node.audit import AETitle, queries
from node.audit.models import AERole
from node.dicomweb import tokens
from node.runtime import metrics
from node.web.auth import Session
from node.web.console import AdminForm, Console, ConsoleDep, Form, ViewerSession, back, render

router = APIRouter()


def _ae_page(
    request: Request, session: Session, console: Console, new_token: str = "", token_source: str = ""
) -> HTMLResponse:
    store = console.store
    edit = store.get_ae(request.query_params.get("edit", "")) if request.query_params.get("edit") else None
    echo_events = {e.detail.get("name"): e for e in reversed(queries.recent_events(store, 200, "ae.echo"))}
    return render(
        request,
        "ae.html",
        session,
        aes=store.list_ae(),
        edit=edit,
        roles=[str(r) for r in AERole],
        echoes=echo_events,
        tokens=store.list_stow_tokens(),
        stow_enabled=console.settings.dicomweb.enabled,
        new_token=new_token,
        token_source=token_source,
    )


@router.get("/ae", response_class=HTMLResponse)
def ae_list(request: Request, session: ViewerSession, console: ConsoleDep) -> HTMLResponse:
    return _ae_page(request, session, console)


def _ae_fields(form: Form, existing: AETitle | None = None) -> dict[str, Any]:
    """The [[ae]] fields as typed values (DICOM host/port, or a STOW-RS url with its auth); node.admin
    validates them like the configuration file. An empty secret on an edit keeps the stored one."""
    port_text = form.get("port").strip()
    if port_text and not port_text.isdigit():
        raise AdminError(f"port: {port_text!r} is not a number")
    url = form.get("url").strip() or None
    secret = form.get("secret") or (existing.secret if existing is not None and existing.url else "")
    return {
        "host": form.get("host").strip() or None,
        "port": int(port_text) if port_text else None,
        "role": form.get("role", "both"),
        "tls": form.get("tls") == "on",
        "storage_commitment": form.get("storage_commitment") == "on",
        "description": form.get("description").strip(),
        "url": url,
        "auth": form.get("auth", "none") if url else "none",
        "username": form.get("username").strip() if url else "",
        "secret": secret if url else "",
    }


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
        console.admin.update_ae(name, actor=form.actor, **_ae_fields(form, console.store.get_ae(name)))
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
        return back("/ae", msg=f"{result.protocol} {name}: {result.detail} in {result.round_trip_ms:.0f} ms")
    return back("/ae", err=f"{result.protocol} {name} failed: {result.detail}")


# -- STOW-RS tokens (on the AE page: a token's source stands for a calling AE title) --


@router.post("/stow-tokens", response_class=HTMLResponse)
def token_add(request: Request, form: AdminForm, console: ConsoleDep) -> Response:
    try:
        new = tokens.add_token(
            console.store, form.get("source"), description=form.get("description").strip(), actor=form.actor
        )
    except tokens.TokenError as e:
        return back("/ae", err=str(e))
    metrics.count_web_action("stow_token_add")
    # Rendered, not redirected: the token must not travel in a URL (history, proxy logs). Shown once.
    return _ae_page(request, form.session, console, new_token=new.token, token_source=new.row.source)


@router.post("/stow-tokens/{token_id}/revoke")
def token_revoke(token_id: int, form: AdminForm, console: ConsoleDep) -> Response:
    try:
        row = tokens.revoke_token(console.store, token_id, actor=form.actor)
    except tokens.TokenError as e:
        return back("/ae", err=str(e))
    metrics.count_web_action("stow_token_revoke")
    return back("/ae", msg=f"token {row.id} of {row.source} revoked")
