"""Liveness and readiness of a node.

`/healthz` says only that the process answers (a supervisor restarts it otherwise). `/readyz` runs
the checks below in parallel, each with a short timeout, and is ready when every *critical* one
passes:

- database — `SELECT 1` on the audit DB (critical: no row, no ack);
- broker — a connection to the Celery broker (critical: instances would pile up in the outbox);
- spool — free space on the data volume above `storage.min_free_mb` and the spool writable
  (critical: below the watermark the SCP answers 0xA700 anyway);
- workers — Celery `control.ping` (not critical: the node keeps accepting and queueing while GPU
  hosts are away, which is the point of the queue; the result is still shown and exported).

Each check returns a `CheckResult`; nothing here raises.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from node.audit.db import Engine, ping
from node.runtime.config import Settings
from workers.api import INFERENCE_QUEUE

log = logging.getLogger(__name__)


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str
    critical: bool = True
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Readiness:
    ready: bool
    checks: list[CheckResult]

    def as_dict(self) -> dict[str, Any]:
        return {"ready": self.ready, "checks": {c.name: asdict(c) for c in self.checks}}


def _timed(name: str, critical: bool, fn: Callable[[], tuple[bool, str, dict[str, Any]]]) -> CheckResult:
    start = time.monotonic()
    try:
        ok, detail, data = fn()
    except Exception as e:  # noqa: BLE001 — a failed check is a result, not an error
        ok, detail, data = False, f"{type(e).__name__}: {e}", {}
    return CheckResult(name, ok, detail, critical, round(time.monotonic() - start, 4), data)


def check_database(engine: Engine) -> CheckResult:
    def probe() -> tuple[bool, str, dict[str, Any]]:
        return True, ping(engine), {}

    return _timed("database", True, probe)


def _redact_url(url: str) -> str:
    """Broker URLs may carry a password: never show it."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def _transport_options(url: str, timeout: float) -> dict[str, Any]:
    """The transport options the node and workers publish with (Redis priority lists), short timeouts."""
    from workers.api import celery_settings

    options = dict(celery_settings(url).get("broker_transport_options") or {})
    if url.startswith("redis"):
        options.update(socket_connect_timeout=timeout, socket_timeout=timeout)
    return options


def check_broker(url: str, timeout: float = 2.0) -> CheckResult:
    def probe() -> tuple[bool, str, dict[str, Any]]:
        from kombu.connection import Connection

        with Connection(url, connect_timeout=timeout, transport_options=_transport_options(url, timeout)) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=timeout)
        return True, f"{_redact_url(url)} reachable", {}

    return _timed("broker", True, probe)


def queue_depth(url: str, queue: str, timeout: float = 2.0) -> int | None:
    """Messages waiting in `queue` on the broker (all priority lists), or None when it cannot be asked."""
    from kombu.connection import Connection

    try:
        with Connection(url, connect_timeout=timeout, transport_options=_transport_options(url, timeout)) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=timeout)
            # Not passive: Redis deletes an empty list, so a passive declare of an empty queue fails
            # ("no queue") and the depth gauge vanished exactly when all work was done. Declaring is
            # harmless on every transport (no key is written on Redis).
            ok = conn.default_channel.queue_declare(queue=queue, passive=False)
            return int(ok.message_count)
    except Exception as e:  # noqa: BLE001 — unknown depth is shown as such
        log.debug("queue depth of %s unavailable: %s", queue, e)
        return None


def disk_usage(path: Path) -> dict[str, int]:
    """total/used/free bytes of the volume holding `path` (its nearest existing parent)."""
    p = path.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    u = shutil.disk_usage(p)
    return {"total": u.total, "used": u.used, "free": u.free}


def check_spool(settings: Settings) -> CheckResult:
    def probe() -> tuple[bool, str, dict[str, Any]]:
        usage = disk_usage(settings.storage.data_dir)
        free_mb = usage["free"] // (1024 * 1024)
        data = {**usage, "min_free_mb": settings.storage.min_free_mb}
        spool = settings.storage.spool_dir
        if spool.exists() and not os.access(spool, os.W_OK):
            return False, f"spool {spool} is not writable", data
        if free_mb < settings.storage.min_free_mb:
            return False, f"{free_mb} MB free, below the {settings.storage.min_free_mb} MB watermark", data
        return True, f"{free_mb} MB free (watermark {settings.storage.min_free_mb} MB)", data

    return _timed("spool", True, probe)


_ping_apps: dict[str, Any] = {}


def check_workers(url: str, timeout: float = 1.0, queue: str = INFERENCE_QUEUE) -> CheckResult:
    """Celery workers consuming `queue` (the node's own `node`-queue consumer does not count).

    Transports without broadcast (the embedded kombu SQLAlchemy one) cannot be asked: not ok, and
    `cxrnode serve` should pass `supervised_workers_probe` instead.
    """

    def probe() -> tuple[bool, str, dict[str, Any]]:
        from celery import Celery

        if url.startswith(("sqla+", "filesystem")):
            return False, "workers cannot be pinged over this broker (embedded mode: see the supervisor)", {}
        app = _ping_apps.get(url)
        if app is None:
            app = _ping_apps[url] = Celery("cxrnode-health", broker=url, set_as_current=False)
            app.conf.broker_connection_timeout = timeout
            app.conf.broker_transport_options = _transport_options(url, timeout)
        with app.connection_for_write() as conn:
            # Fail fast on a dead broker instead of Celery's own connection retries.
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=timeout)
            replies = app.control.inspect(timeout=timeout, connection=conn).active_queues() or {}
        names = sorted(
            worker for worker, queues in replies.items() if any(q.get("name") == queue for q in queues or [])
        )
        if not names:
            return False, f"no worker consumes queue {queue!r}", {"workers": []}
        return True, f"{len(names)} worker(s) on {queue!r}: {', '.join(names)}", {"workers": names}

    return _timed("workers", False, probe)


def supervised_workers_probe(
    expected: list[str], pids: Callable[[], dict[str, int]], restarts: Callable[[], dict[str, int]] | None = None
) -> Callable[[], CheckResult]:
    """Worker check for embedded mode: the local worker processes `cxrnode serve` supervises are alive.

    Wire it as `supervised_workers_probe([c.name for c in sup.children], sup.pids, sup.restarts)`.
    """

    def probe() -> CheckResult:
        def run() -> tuple[bool, str, dict[str, Any]]:
            alive = pids()
            missing = [name for name in expected if name not in alive]
            counts = restarts() if restarts is not None else {}
            data = {"workers": sorted(alive), "restarts": counts}
            if missing:
                return False, f"not running: {', '.join(missing)} (restarting)", data
            restarted = sum(counts.values())
            return (
                True,
                f"{len(alive)} local worker process(es) running"
                + (f", {restarted} restart(s) since start" if restarted else ""),
                data,
            )

        return _timed("workers", False, run)

    return probe


def readiness(
    settings: Settings, engine: Engine, timeout: float = 3.0, workers_probe: Callable[[], CheckResult] | None = None
) -> Readiness:
    """Run all checks concurrently; a check still running after `timeout` counts as failed."""
    jobs: dict[str, Callable[[], CheckResult]] = {
        "database": lambda: check_database(engine),
        "broker": lambda: check_broker(settings.broker_url, timeout=min(2.0, timeout)),
        "spool": lambda: check_spool(settings),
        "workers": workers_probe or (lambda: check_workers(settings.broker_url, timeout=min(1.0, timeout))),
    }
    results: list[CheckResult] = []
    pool = ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="readyz")
    try:
        futures = {name: pool.submit(fn) for name, fn in jobs.items()}
        deadline = time.monotonic() + timeout
        for name, fut in futures.items():
            try:
                results.append(fut.result(timeout=max(0.0, deadline - time.monotonic())))
            except FutureTimeout:
                results.append(
                    CheckResult(
                        name, False, f"no answer within {timeout:.1f} s", critical=name != "workers", seconds=timeout
                    )
                )
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a hung probe must not hang the endpoint
    return Readiness(all(c.ok for c in results if c.critical), results)
