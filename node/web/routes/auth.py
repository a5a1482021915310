"""Login (throttled per address and per account) and logout (the session is revoked server-side)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from node.web.auth import authenticate
from node.web.console import COOKIE, ConsoleDep, UserForm, local_path, render

log = logging.getLogger(__name__)
router = APIRouter()


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> HTMLResponse:
    return render(request, "login.html", None, next=request.query_params.get("next", "/"))


@router.post("/login")
async def login(request: Request, console: ConsoleDep) -> Response:
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    user, password = form.get("username", ""), form.get("password", "")
    next_url = local_path(form.get("next", "/"))
    peer = request.client.host if request.client else ""
    # Per account only for accounts that exist: made-up names cannot grow the table.
    by_account = f"account:{user}" if user in console.users else peer
    if (wait := max(console.throttle.retry_after(peer), console.throttle.retry_after(by_account))) > 0:
        log.warning("console login for %r from %s refused: throttled", user[:40], peer)
        return render(
            request,
            "login.html",
            None,
            status=429,
            next=next_url,
            error=f"Too many failed logins: try again in {max(wait / 60, 1):.0f} minute(s).",
        )
    account = authenticate(console.users, user, password)
    if account is None:
        console.throttle.failed(peer)
        if by_account != peer:
            console.throttle.failed(by_account)
        console.store.add_event("web.login_failed", actor=f"web:{user[:40]}", detail={"peer": peer})
        log.warning("console login failed for %r from %s", user[:40], peer)
        return render(request, "login.html", None, status=401, next=next_url, error="Wrong user name or password.")
    console.throttle.succeeded(peer)
    console.throttle.succeeded(by_account)
    cookie, _ = console.signer.issue(user)
    console.store.add_event("web.login", actor=f"web:{user}", detail={"peer": peer, "role": account.role})
    response = RedirectResponse(next_url, status_code=303)
    # Secure whenever the console is served over TLS, its own or a proxy's (web.tls_*, behind_tls_proxy,
    # or https as a trusted proxy says); only a development console on plain HTTP goes without.
    web_cfg = console.settings.web
    secure = web_cfg.tls or web_cfg.behind_tls_proxy or request.url.scheme == "https"
    response.set_cookie(
        COOKIE, cookie, max_age=int(console.signer.max_age), httponly=True, samesite="strict", secure=secure
    )
    return response


@router.post("/logout")
async def logout(form: UserForm, console: ConsoleDep) -> Response:
    console.revoked.revoke(form.session)
    console.store.add_event("web.logout", actor=form.actor)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response
