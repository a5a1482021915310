"""What every console route shares: the Console (settings, store, admin service, users, templates), the
session and admin-form dependencies, and rendering.

Routes get the console from the app (`request.app.state.console`) through FastAPI dependencies:
`ViewerSession` (a logged-in user, else a redirect to the login page) for pages, `AdminForm` (CSRF
token checked, admin role, else 403 audited as `web.denied`) for every state-changing POST.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from node.admin.service import AdminService
from node.audit.store import AuditStore
from node.runtime.config import Settings
from node.runtime.health import CheckResult
from node.web.auth import LoginThrottle, RevokedSessions, Session, SessionSigner, User

log = logging.getLogger(__name__)

COOKIE = "cxrnode_session"


def local_path(target: str, default: str = "/") -> str:
    """`target` when it is a path on this site ("/studies?x=1"), else `default`: no open redirect
    (absolute URLs, "//host", "/\\host" and control characters are all refused)."""
    if not target.startswith("/") or target.startswith(("//", "/\\")) or any(c < " " for c in target):
        return default
    return target


class LoginRequired(Exception):
    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


class AdminRequired(Exception):
    """A viewer tried an action (answered 403)."""


@dataclass
class Console:
    settings: Settings
    store: AuditStore
    admin: AdminService
    users: dict[str, User]
    signer: SessionSigner
    templates: Jinja2Templates
    weights_dir: Path
    workers_probe: Callable[[], CheckResult] | None
    throttle: LoginThrottle
    revoked: RevokedSessions


def console_of(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def current_session(request: Request) -> Session:
    """The logged-in user's session; LoginRequired (→ the login page) otherwise."""
    console = console_of(request)
    session = console.signer.load(request.cookies.get(COOKIE))
    # A user no longer configured is logged out even though the key (and so the cookie) outlived the restart;
    # a session ended by logout stays ended whoever replays its cookie.
    if session is None or session.user not in console.users or console.revoked.is_revoked(session):
        raise LoginRequired(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    return session


def logged_in(request: Request) -> bool:
    try:
        current_session(request)
    except LoginRequired:
        return False
    return True


@dataclass(frozen=True)
class Form:
    """A checked state-changing request: its session, the acting user (`web:<name>`) and its fields."""

    session: Session
    fields: dict[str, str]

    @property
    def actor(self) -> str:
        return f"web:{self.session.user}"

    def get(self, key: str, default: str = "") -> str:
        return self.fields.get(key, default)


async def _checked_form(request: Request, *, admin: bool) -> Form:
    """Logged in, the form's CSRF token matches the session's, and (for every action but logging out)
    the user is an admin."""
    console = console_of(request)
    session = current_session(request)
    fields = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    if fields.get("csrf") != session.csrf:
        raise LoginRequired(request.url.path)  # stale or forged form: log in again
    if admin and not console.users[session.user].is_admin:
        console.store.add_event(
            "web.denied", actor=f"web:{session.user}", detail={"method": request.method, "path": request.url.path}
        )
        log.warning("console: viewer %r may not %s %s", session.user, request.method, request.url.path)
        raise AdminRequired()
    return Form(session, fields)


async def admin_form(request: Request) -> Form:
    return await _checked_form(request, admin=True)


async def user_form(request: Request) -> Form:
    return await _checked_form(request, admin=False)


ViewerSession = Annotated[Session, Depends(current_session)]
AdminForm = Annotated[Form, Depends(admin_form)]
UserForm = Annotated[Form, Depends(user_form)]
ConsoleDep = Annotated[Console, Depends(console_of)]


def back(path: str, msg: str = "", err: str = "") -> RedirectResponse:
    path = local_path(path, "/studies")
    params = {k: v for k, v in (("msg", msg), ("err", err)) if v}
    separator = "&" if "?" in path else "?"
    return RedirectResponse(path + (f"{separator}{urlencode(params)}" if params else ""), status_code=303)


def render(request: Request, template: str, session: Session | None, status: int = 200, **context: Any) -> HTMLResponse:
    console = console_of(request)
    user = console.users.get(session.user) if session else None
    context.update(
        request=request,
        user=user.name if user else None,
        csrf=session.csrf if session else "",
        role=user.role if user else None,
        can_act=bool(user and user.is_admin),
        msg=request.query_params.get("msg", ""),
        err=request.query_params.get("err", ""),
        ae_title=console.settings.dicom.ae_title,
        node_name=console.settings.node_name,
        production=console.settings.web.production,
    )
    return console.templates.TemplateResponse(request, template, context, status_code=status)


def fmt_dt(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""
