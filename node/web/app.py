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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydicom.uid import UID

from node import metrics
from node.ae_admin import validate_entry
from node.audit.models import AERole, InstanceState
from node.audit.store import AuditStore, StoreError
from node.config import Settings, validate_ae_title, validate_port
from node.dicomweb import tokens
from node.health import CheckResult, Readiness, disk_usage, queue_depth, readiness
from node.web import queries, session_key
from node.web.actions import ActionError, ConsoleActions
from node.web.auth import (
    LoginThrottle,
    RevokedSessions,
    Session,
    SessionSigner,
    User,
    authenticate,
    resolve_users,
)
from node.web.results_view import (
    default_weights_dir,
    legend,
    read_model_cards,
    safe_overlay,
    severity,
    sr_measurements,
)

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
COOKIE = "cxrnode_session"
INFERENCE_QUEUE = "inference"


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
    actions: ConsoleActions
    users: dict[str, User]
    signer: SessionSigner
    templates: Jinja2Templates
    weights_dir: Path
    workers_probe: Callable[[], CheckResult] | None
    throttle: LoginThrottle
    revoked: RevokedSessions


def create_app(settings: Settings, store: AuditStore, *, actions: ConsoleActions | None = None,
               workers_probe: Callable[[], CheckResult] | None = None,
               weights_dir: Path | None = None) -> FastAPI:
    """The web app. Raises node.web.auth.AuthConfigError when production mode has no console user, a
    password hash is malformed or the session key file is unusable."""
    web = settings.web
    users, one_time = resolve_users([(u.name, u.password_hash, u.role) for u in web.users],
                                    admin_user=web.admin_user, password_hash=web.password_hash,
                                    production=web.production)
    if one_time is not None:
        # Dev mode only (production refuses to start without a user): shown once, lives in this process.
        log.warning("web console: no console user configured; one-time login for this run: user %r password %s",
                    web.admin_user, one_time)
    signer = SessionSigner(session_key.load_or_create(session_key.key_path(settings)),
                           max_age=web.session_hours * 3600)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["dt"] = _fmt_dt
    templates.env.filters["mb"] = lambda b: f"{(b or 0) / 1e6:,.1f} MB"
    templates.env.filters["uid_name"] = lambda uid: UID(uid).name if uid else ""
    templates.env.globals["INSTANCE_STATES"] = [str(s) for s in InstanceState]
    console = Console(
        settings=settings, store=store,
        actions=actions or ConsoleActions(store, calling_ae=settings.sender.calling_ae or settings.dicom.ae_title,
                                          tls=settings.dicom.tls),
        users=users, signer=signer, templates=templates,
        weights_dir=weights_dir or default_weights_dir(), workers_probe=workers_probe, throttle=LoginThrottle(),
        revoked=RevokedSessions(session_key.revoked_path(settings)))

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
    metrics.register_audit_collector(metrics.AuditCollector(
        lambda: queries.instance_counts(store), lambda: queries.export_counts(store),
        lambda: queue_depth(settings.broker_url, INFERENCE_QUEUE), lambda: queries.event_counts(store),
        triage_counts=store.triage_level_counts, alert_counts=store.alert_counts))

    @app.exception_handler(LoginRequired)
    async def _to_login(request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/login?{urlencode({'next': exc.next_url})}", status_code=303)

    @app.exception_handler(AdminRequired)
    async def _forbidden(request: Request, exc: AdminRequired) -> Response:
        session = console.signer.load(request.cookies.get(COOKIE))
        return _render(console, request, "forbidden.html", session, status=403)

    _add_ops_routes(app, console)
    _add_auth_routes(app, console)
    _add_pages(app, console)
    from node.web.triage_pages import add_triage_pages

    add_triage_pages(app, console)
    return app


def _fmt_dt(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


# -- helpers ----------------------------------------------------------------------------------------------


def _session(request: Request, console: Console) -> Session:
    session = console.signer.load(request.cookies.get(COOKIE))
    # A user no longer configured is logged out even though the key (and so the cookie) outlived the restart;
    # a session ended by logout stays ended whoever replays its cookie.
    if session is None or session.user not in console.users or console.revoked.is_revoked(session):
        raise LoginRequired(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
    return session


async def _post(request: Request, console: Console, *, admin: bool = True) -> tuple[Session, dict[str, str]]:
    """A state-changing request: logged in, the form's CSRF token matches the session's, and (for
    every action but logging out) the user is an admin."""
    session = _session(request, console)
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    if form.get("csrf") != session.csrf:
        raise LoginRequired(request.url.path)  # stale or forged form: log in again
    if admin and not console.users[session.user].is_admin:
        console.store.add_event("web.denied", actor=f"web:{session.user}",
                                detail={"method": request.method, "path": request.url.path})
        log.warning("console: viewer %r may not %s %s", session.user, request.method, request.url.path)
        raise AdminRequired()
    return session, form


def _back(path: str, msg: str = "", err: str = "") -> RedirectResponse:
    path = local_path(path, "/studies")
    params = {k: v for k, v in (("msg", msg), ("err", err)) if v}
    separator = "&" if "?" in path else "?"
    return RedirectResponse(path + (f"{separator}{urlencode(params)}" if params else ""), status_code=303)


def _render(console: Console, request: Request, template: str, session: Session | None, status: int = 200,
            **context: Any) -> HTMLResponse:
    user = console.users.get(session.user) if session else None
    context.update(request=request, user=user.name if user else None, csrf=session.csrf if session else "",
                   role=user.role if user else None, can_act=bool(user and user.is_admin),
                   msg=request.query_params.get("msg", ""), err=request.query_params.get("err", ""),
                   ae_title=console.settings.dicom.ae_title, production=console.settings.web.production)
    return console.templates.TemplateResponse(request, template, context, status_code=status)


# -- /metrics, /healthz, /readyz (no login: scraped by Prometheus and probed by orchestrators) ---------


def _logged_in(request: Request, console: Console) -> bool:
    try:
        _session(request, console)
    except LoginRequired:
        return False
    return True


def _add_ops_routes(app: FastAPI, console: Console) -> None:
    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(request: Request) -> JSONResponse:
        """Status code and which checks pass for anyone (probes); what each found (versions, URLs, free
        space) only for a logged-in console user."""
        result = readiness(console.settings, console.store.engine, workers_probe=console.workers_probe)
        body = result.as_dict()
        if not _logged_in(request, console):
            body["checks"] = {name: {k: v for k, v in check.items() if k not in ("detail", "data")}
                              for name, check in body["checks"].items()}
        return JSONResponse(body, status_code=200 if result.ready else 503)

    @app.get("/metrics")
    def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)


# -- login ------------------------------------------------------------------------------------------------


def _add_auth_routes(app: FastAPI, console: Console) -> None:
    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request) -> HTMLResponse:
        return _render(console, request, "login.html", None, next=request.query_params.get("next", "/"))

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        user, password = form.get("username", ""), form.get("password", "")
        next_url = local_path(form.get("next", "/"))
        peer = request.client.host if request.client else ""
        # Per account only for accounts that exist: made-up names cannot grow the table.
        by_account = f"account:{user}" if user in console.users else peer
        if (wait := max(console.throttle.retry_after(peer), console.throttle.retry_after(by_account))) > 0:
            log.warning("console login for %r from %s refused: throttled", user[:40], peer)
            return _render(console, request, "login.html", None, status=429, next=next_url,
                           error=f"Too many failed logins: try again in {max(wait / 60, 1):.0f} minute(s).")
        account = authenticate(console.users, user, password)
        if account is None:
            console.throttle.failed(peer)
            if by_account != peer:
                console.throttle.failed(by_account)
            console.store.add_event("web.login_failed", actor=f"web:{user[:40]}", detail={"peer": peer})
            log.warning("console login failed for %r from %s", user[:40], peer)
            return _render(console, request, "login.html", None, status=401, next=next_url,
                           error="Wrong user name or password.")
        console.throttle.succeeded(peer)
        console.throttle.succeeded(by_account)
        cookie, _ = console.signer.issue(user)
        console.store.add_event("web.login", actor=f"web:{user}", detail={"peer": peer, "role": account.role})
        response = RedirectResponse(next_url, status_code=303)
        # Secure whenever the console is served over TLS, its own or a proxy's (web.tls_*, behind_tls_proxy,
        # or https as a trusted proxy says); only a development console on plain HTTP goes without.
        web_cfg = console.settings.web
        secure = web_cfg.tls or web_cfg.behind_tls_proxy or request.url.scheme == "https"
        response.set_cookie(COOKIE, cookie, max_age=int(console.signer.max_age), httponly=True,
                            samesite="strict", secure=secure)
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        session, _ = await _post(request, console, admin=False)
        console.revoked.revoke(session)
        console.store.add_event("web.logout", actor=f"web:{session.user}")
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response


# -- pages ------------------------------------------------------------------------------------------------


def _add_pages(app: FastAPI, console: Console) -> None:  # noqa: C901 — one route table, read top to bottom
    store, settings = console.store, console.settings

    @app.get("/", response_class=HTMLResponse)
    def dashboard(request: Request) -> HTMLResponse:
        session = _session(request, console)
        ready: Readiness = readiness(settings, store.engine, workers_probe=console.workers_probe)
        checks = {c.name: c for c in ready.checks}
        return _render(console, request, "dashboard.html", session, today=queries.today(store),
                       states=queries.instance_counts(store), ready=ready, checks=checks,
                       queued=queries.queued_count(store),
                       broker_depth=queue_depth(settings.broker_url, INFERENCE_QUEUE),
                       disk=disk_usage(settings.storage.data_dir),
                       events=queries.recent_events(store, limit=15))

    @app.get("/studies", response_class=HTMLResponse)
    def studies(request: Request) -> HTMLResponse:
        session = _session(request, console)
        p = request.query_params
        search = queries.StudySearch(date_from=p.get("date_from", ""), date_to=p.get("date_to", ""),
                                     calling_ae=p.get("ae", ""), state=p.get("state", ""),
                                     accession=p.get("accession", ""), text=p.get("q", ""))
        error = ""
        try:
            rows = queries.search_studies(store, search)
        except ValueError as e:
            rows, error = [], f"Dates are YYYY-MM-DD ({e})."
        return _render(console, request, "studies.html", session, rows=rows, search=search, search_error=error,
                       ae_names=[a.name for a in store.list_ae()])

    @app.get("/studies/{study_id}", response_class=HTMLResponse)
    def study(request: Request, study_id: int) -> HTMLResponse:
        session = _session(request, console)
        detail = queries.study_detail(store, study_id)
        if detail is None:
            return _render(console, request, "not_found.html", session, status=404, what=f"study {study_id}")
        results: dict[int, dict[str, Any]] = {}
        for inst in detail.instances:
            exports = detail.exports.get(inst.id, [])
            seg = next((Path(e.file_path) for e in exports if e.kind == "seg" and Path(e.file_path).exists()), None)
            sr = next((Path(e.file_path) for e in exports if e.kind == "sr" and Path(e.file_path).exists()), None)
            measurements = sr_measurements(sr) if sr else []
            results[inst.id] = {"seg": seg, "sr": sr, "measurements": measurements,
                                "severity": severity(measurements), "legend": legend(seg) if seg else [],
                                "thumbnail": bool(inst.spool_path) and Path(inst.spool_path).exists()}
        from node.triage.worklist import alert_rows, patient_trend

        triage = store.get_triage(study_id)
        return _render(console, request, "study.html", session, d=detail, results=results, triage=triage,
                       alerts=alert_rows(store, study_id=study_id),
                       trend=patient_trend(store, triage.patient_id) if triage else [])

    @app.get("/instances/{instance_id}/overlay.png")
    def overlay(request: Request, instance_id: int) -> Response:
        _session(request, console)
        try:
            inst = store.get_instance(instance_id)
        except StoreError:
            return Response(status_code=404)
        seg = next((Path(e.file_path) for e in store.list_exports(instance_id)
                    if e.kind == "seg" and Path(e.file_path).exists()), None)
        png = safe_overlay(settings, Path(inst.spool_path), seg) if inst.spool_path else None
        if png is None:
            return Response(status_code=404)
        return Response(png, media_type="image/png")  # PHI: no-store, like the pages

    @app.post("/instances/{instance_id}/rerun")
    async def rerun(request: Request, instance_id: int) -> Response:
        session, form = await _post(request, console)
        back = form.get("back", "/studies")
        try:
            msg = console.actions.rerun(instance_id, session.user)
        except ActionError as e:
            return _back(back, err=str(e))
        metrics.count_web_action("rerun")
        return _back(back, msg=msg)

    @app.post("/instances/{instance_id}/resend")
    async def resend(request: Request, instance_id: int) -> Response:
        session, form = await _post(request, console)
        back = form.get("back", "/studies")
        try:
            msg = console.actions.resend(instance_id, session.user)
        except ActionError as e:
            return _back(back, err=str(e))
        metrics.count_web_action("resend")
        return _back(back, msg=msg)

    # -- AE titles --

    def _ae_page(request: Request, session: Session, new_token: str = "", token_source: str = "") -> HTMLResponse:
        edit = store.get_ae(request.query_params.get("edit", "")) if request.query_params.get("edit") else None
        echo_events = {e.detail.get("name"): e for e in reversed(queries.recent_events(store, 200, "ae.echo"))}
        return _render(console, request, "ae.html", session, aes=store.list_ae(), edit=edit,
                       roles=[str(r) for r in AERole], echoes=echo_events, tokens=store.list_stow_tokens(),
                       stow_enabled=console.settings.dicomweb.enabled, new_token=new_token,
                       token_source=token_source)

    @app.get("/ae", response_class=HTMLResponse)
    def ae_list(request: Request) -> HTMLResponse:
        return _ae_page(request, _session(request, console))

    def _ae_fields(form: dict[str, str], name: str, existing: Any = None) -> dict[str, Any]:
        """Validated fields from a form (DICOM host/port or a STOW-RS url with its auth); ValueError names the
        bad field. An empty secret on an edit keeps the stored one."""
        host = form.get("host", "").strip() or None
        port_text = form.get("port", "").strip()
        try:
            port = validate_port(int(port_text)) if port_text else None
        except ValueError as e:
            raise ValueError(f"port: {e}" if port_text.isdigit() else f"port: {port_text!r} is not a number") from e
        role = form.get("role", "both")
        if role not in {str(r) for r in AERole}:
            raise ValueError(f"role: {role!r} is not one of source, destination, both")
        url = form.get("url", "").strip() or None
        secret = form.get("secret", "") or (existing.secret if existing is not None and existing.url else "")
        entry = validate_entry(name, host=host, port=port, role=role, tls=form.get("tls") == "on",
                               description=form.get("description", "").strip(), url=url,
                               auth=form.get("auth", "none") if url else "none",
                               username=form.get("username", "").strip() if url else "",
                               secret=secret if url else "")
        return {"host": entry.host, "port": entry.port, "role": entry.role, "tls": entry.tls,
                "description": entry.description, "url": entry.url, "auth": entry.auth,
                "username": entry.username, "secret": entry.secret}

    @app.post("/ae")
    async def ae_add(request: Request) -> Response:
        session, form = await _post(request, console)
        try:
            name = validate_ae_title(form.get("name", ""))
            fields = _ae_fields(form, name)
            store.add_ae(name, actor=f"web:{session.user}", **fields)
        except (ValueError, StoreError) as e:
            return _back("/ae", err=str(e))
        metrics.count_web_action("ae_add")
        return _back("/ae", msg=f"AE title {name} added")

    @app.post("/ae/{name}")
    async def ae_update(request: Request, name: str) -> Response:
        session, form = await _post(request, console)
        try:
            store.update_ae(name, actor=f"web:{session.user}", **_ae_fields(form, name, store.get_ae(name)))
        except (ValueError, StoreError) as e:
            return _back(f"/ae?edit={quote(name)}", err=str(e))
        metrics.count_web_action("ae_update")
        return _back("/ae", msg=f"AE title {name} updated")

    @app.post("/ae/{name}/remove")
    async def ae_remove(request: Request, name: str) -> Response:
        session, _ = await _post(request, console)
        try:
            store.remove_ae(name, actor=f"web:{session.user}")
        except StoreError as e:
            return _back("/ae", err=str(e))
        metrics.count_web_action("ae_remove")
        return _back("/ae", msg=f"AE title {name} removed")

    # -- STOW-RS tokens (on the AE page: a token's source stands for a calling AE title) --

    @app.post("/stow-tokens", response_class=HTMLResponse)
    async def token_add(request: Request) -> Response:
        session, form = await _post(request, console)
        try:
            new = tokens.add_token(store, form.get("source", ""), description=form.get("description", "").strip(),
                                   actor=f"web:{session.user}")
        except tokens.TokenError as e:
            return _back("/ae", err=str(e))
        metrics.count_web_action("stow_token_add")
        # Rendered, not redirected: the token must not travel in a URL (history, proxy logs). Shown once.
        return _ae_page(request, session, new_token=new.token, token_source=new.row.source)

    @app.post("/stow-tokens/{token_id}/revoke")
    async def token_revoke(request: Request, token_id: int) -> Response:
        session, _ = await _post(request, console)
        try:
            row = tokens.revoke_token(store, token_id, actor=f"web:{session.user}")
        except tokens.TokenError as e:
            return _back("/ae", err=str(e))
        metrics.count_web_action("stow_token_revoke")
        return _back("/ae", msg=f"token {row.id} of {row.source} revoked")

    @app.post("/ae/{name}/echo")
    async def ae_echo(request: Request, name: str) -> Response:
        session, _ = await _post(request, console)
        try:
            result = console.actions.echo_ae(name, session.user)
        except ActionError as e:
            return _back("/ae", err=str(e))
        metrics.count_web_action("ae_echo")
        if result.ok:
            return _back("/ae", msg=f"{result.protocol} {name}: {result.detail} in {result.round_trip_ms:.0f} ms")
        return _back("/ae", err=f"{result.protocol} {name} failed: {result.detail}")

    # -- configuration views, models, dead letters, audit log --

    @app.get("/rules", response_class=HTMLResponse)
    def rules(request: Request) -> HTMLResponse:
        session = _session(request, console)
        return _render(console, request, "rules.html", session, rules=settings.rules, s=settings)

    @app.get("/models", response_class=HTMLResponse)
    def models(request: Request) -> HTMLResponse:
        session = _session(request, console)
        return _render(console, request, "models.html", session, cards=read_model_cards(console.weights_dir),
                       enabled=settings.models, weights_dir=console.weights_dir)

    @app.get("/dead", response_class=HTMLResponse)
    def dead(request: Request) -> HTMLResponse:
        session = _session(request, console)
        return _render(console, request, "dead.html", session, rows=queries.dead_exports(store))

    @app.post("/exports/{export_id}/retry")
    async def export_retry(request: Request, export_id: int) -> Response:
        session, _ = await _post(request, console)
        try:
            msg = console.actions.retry_export(export_id, session.user)
        except ActionError as e:
            return _back("/dead", err=str(e))
        metrics.count_web_action("export_retry")
        return _back("/dead", msg=msg)

    @app.post("/exports/retry-dead")
    async def export_retry_all(request: Request) -> Response:
        session, _ = await _post(request, console)
        msg = console.actions.retry_all_dead(session.user)
        metrics.count_web_action("export_retry")
        return _back("/dead", msg=msg)

    @app.get("/events", response_class=HTMLResponse)
    def events(request: Request) -> HTMLResponse:
        session = _session(request, console)
        prefix = request.query_params.get("kind", "")
        return _render(console, request, "events.html", session,
                       events=queries.recent_events(store, limit=300, prefix=prefix), kind=prefix)

