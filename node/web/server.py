"""Running the web app: inside `cxrnode serve` (a thread) or on its own (`python -m node.web`).

`start_in_thread` binds the port before it returns, so a port already taken fails `cxrnode serve`
at start with a clear error rather than later in a background thread.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

import uvicorn

from node.admin.service import AdminService
from node.audit.store import AuditStore
from node.runtime.config import Settings, find_config, load_settings
from node.runtime.health import CheckResult
from node.runtime.logging_setup import setup_logging
from node.web.app import create_app

log = logging.getLogger(__name__)


class WebServer:
    """A uvicorn server on its own thread; `stop()` ends it (idempotent)."""

    def __init__(
        self, server: uvicorn.Server, sock: socket.socket, thread: threading.Thread, scheme: str = "http"
    ) -> None:
        self._server, self._sock, self._thread = server, sock, thread
        self.scheme = scheme

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        host = self._sock.getsockname()[0]
        return f"{self.scheme}://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def uvicorn_config(settings: Settings, app: Any, **extra: Any) -> uvicorn.Config:
    """How every console is served: HTTPS with web.tls_*, forwarded headers only from web.trusted_proxies
    (uvicorn's default believes any process on the host)."""
    web = settings.web
    proxies = web.trusted_proxies
    return uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
        proxy_headers=bool(proxies),
        forwarded_allow_ips=",".join(proxies) or None,
        ssl_certfile=str(web.tls_cert_file) if web.tls else None,
        ssl_keyfile=str(web.tls_key_file) if web.tls else None,
        **extra,
    )


def start_in_thread(
    settings: Settings,
    store: AuditStore,
    *,
    admin: AdminService | None = None,
    workers_probe: Callable[[], CheckResult] | None = None,
    port: int | None = None,
) -> WebServer:
    """Console + /metrics + /healthz + /readyz on web.host:web.port (port=0 picks a free one).

    Raises AuthConfigError (production without password hash) or OSError (port taken) at once.
    """
    app = create_app(settings, store, admin=admin, workers_probe=workers_probe)
    sock = bind_socket(settings.web.host, settings.web.port if port is None else port)
    server = uvicorn.Server(uvicorn_config(settings, app))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="cxrnode-web", daemon=True)
    thread.start()
    web = WebServer(server, sock, thread, scheme="https" if settings.web.tls else "http")
    log.info("web console on %s", web.url)
    return web


def start_console(
    settings: Settings,
    store: AuditStore,
    *,
    enqueue_analysis: Callable[[int], None] | None = None,
    kick_sender: Callable[[], None] | None = None,
    workers_probe: Callable[[], CheckResult] | None = None,
) -> WebServer | None:
    """What `cxrnode serve` calls after the SCP starts: the console when `web.enabled`, else None.

    `enqueue_analysis(instance_id)` hands a re-run to the analysis queue, `kick_sender()` wakes the
    export loop; both optional (without them the outbox/resume passes pick the work up). Call it
    before binding the DICOM port if a production configuration without a password hash must stop
    the start: it raises AuthConfigError at once.
    """
    if not settings.web.enabled:
        log.info("web console disabled (web.enabled = false)")
        return None
    admin = AdminService.for_settings(settings, store, enqueue_analysis=enqueue_analysis, kick_sender=kick_sender)
    return start_in_thread(settings, store, admin=admin, workers_probe=workers_probe)


def main(argv: list[str] | None = None) -> int:
    """Standalone console (`python -m node.web --config FILE`): same pages, no DICOM listener."""
    parser = argparse.ArgumentParser(prog="python -m node.web", description="cxr-node web console only")
    parser.add_argument(
        "--config",
        help="TOML configuration file (default: $CXRNODE_CONFIG, else /etc/cxrnode/cxrnode.toml if it exists)",
    )
    parser.add_argument("--port", type=int, help="override web.port")
    args = parser.parse_args(argv)
    settings = load_settings(find_config(args.config))
    setup_logging(json_logs=settings.web.json_logs)
    from node.runtime.preflight import console_problems

    if problems := console_problems(settings):
        sys.stderr.write("the console cannot start:\n" + "".join(f"  {p}\n" for p in problems))
        return 1
    store = AuditStore.open(settings.database_url, node=settings.node_name)
    app = create_app(settings, store)
    uvicorn.Server(uvicorn_config(settings, app, host=settings.web.host, port=args.port or settings.web.port)).run()
    return 0
