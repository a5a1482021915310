"""The node's HTTP server: admin console (server-rendered), /metrics, /healthz, /readyz.

`create_app(settings, store, ...)` builds a FastAPI app around one audit store. Pages are Jinja2
templates with plain HTML forms (no JavaScript build step). Every POST needs a logged-in session
and its CSRF token; every action also needs the admin role (viewers get 403, audited as
`web.denied`); every change goes to the audit log with `actor="web:<user>"`.

Every response carries the security headers of :data:`SECURITY_HEADERS` (a Content Security Policy
that allows only the node's own scripts and styles and no framing, nosniff, no referrer); pages and
images, which show PHI, are also ``Cache-Control: no-store``. Redirects after a form go only to a
path on this console (``back``/``next`` must be relative).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request, Response
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydicom.uid import UID

from node.admin.service import AdminService
from node.audit import queries
from node.audit.models import InstanceState
from node.audit.store import AuditStore
from node.runtime import metrics
from node.runtime.config import Settings
from node.runtime.health import CheckResult, queue_depth
from node.web import session_key
from node.web.auth import LoginThrottle, RevokedSessions, SessionSigner, resolve_users
from node.web.console import COOKIE, AdminRequired, Console, LoginRequired, fmt_dt, render
from node.web.routes import ROUTERS
from workers import catalogue
from workers.api import INFERENCE_QUEUE

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent


#: On every response. Inline styles stay allowed (colour swatches); scripts only from /static.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
#: Responses that are not PHI and may be cached (static files, probes, metrics).
CACHEABLE_PREFIXES = ("/static/", "/healthz", "/readyz", "/metrics")


def create_app(
    settings: Settings,
    store: AuditStore,
    *,
    admin: AdminService | None = None,
    workers_probe: Callable[[], CheckResult] | None = None,
    weights_dir: Path | None = None,
) -> FastAPI:
    """The web app. Raises node.web.auth.AuthConfigError when production mode has no console user, a
    password hash is malformed or the session key file is unusable."""
    web = settings.web
    users, one_time = resolve_users(
        [(u.name, u.password_hash, u.role) for u in web.users],
        admin_user=web.admin_user,
        password_hash=web.password_hash,
        production=web.production,
    )
    if one_time is not None:
        # Dev mode only (production refuses to start without a user): shown once, lives in this process.
        log.warning(
            "web console: no console user configured; one-time login for this run: user %r password %s",
            web.admin_user,
            one_time,
        )
    signer = SessionSigner(session_key.load_or_create(session_key.key_path(settings)), max_age=web.session_hours * 3600)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["dt"] = fmt_dt
    templates.env.filters["mb"] = lambda b: f"{(b or 0) / 1e6:,.1f} MB"
    templates.env.filters["uid_name"] = lambda uid: UID(uid).name if uid else ""
    templates.env.globals["INSTANCE_STATES"] = [str(s) for s in InstanceState]
    console = Console(
        settings=settings,
        store=store,
        admin=admin or AdminService.for_settings(settings, store),
        users=users,
        signer=signer,
        templates=templates,
        weights_dir=weights_dir or catalogue.weights_dir(),
        workers_probe=workers_probe,
        throttle=LoginThrottle(),
        revoked=RevokedSessions(session_key.revoked_path(settings)),
    )

    app = FastAPI(title="cxr-node", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.console = console

    @app.middleware("http")
    async def _security_headers(request: Request, call_next: Callable[[Request], Any]) -> Response:
        response: Response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        if not request.url.path.startswith(CACHEABLE_PREFIXES):
            response.headers["Cache-Control"] = "no-store"
        return response

    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    metrics.register_audit_collector(
        metrics.AuditCollector(
            lambda: queries.instance_counts(store),
            lambda: queries.export_counts(store),
            lambda: queue_depth(settings.broker_url, INFERENCE_QUEUE),
            lambda: queries.event_counts(store),
            triage_counts=store.triage_level_counts,
            alert_counts=store.alert_counts,
        )
    )

    @app.exception_handler(LoginRequired)
    async def _to_login(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/login?{urlencode({'next': exc.next_url})}", status_code=303)

    @app.exception_handler(AdminRequired)
    async def _forbidden(request: Request, exc: AdminRequired) -> Response:
        session = console.signer.load(request.cookies.get(COOKIE))
        return render(request, "forbidden.html", session, status=403)

    for router in ROUTERS:
        app.include_router(router)
    return app
