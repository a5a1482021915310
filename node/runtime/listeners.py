"""Several receiving processes on one port (``dicom.listeners`` > 1).

One Python interpreter receives at most about one core's worth of DICOM: pynetdicom decodes PDUs
and the node fsyncs and commits in the same process, under one GIL. With four concurrent
associations a single process reaches about 0.4x of DCMTK's forking ``storescp`` (see DESIGN.md).
So the node can run N listener processes, each with the same ingest and SCP code, each on its own
``SO_REUSEPORT`` socket bound to the shared port; the kernel spreads new connections over them.
They share only what node replicas share anyway: the audit database (SQLite in WAL mode with
``BEGIN IMMEDIATE``, or PostgreSQL) and the spool directory.

The parent process reserves the port (bound but not listening, so it is never handed a
connection), forks the listeners before it starts any thread, announces "running on" only once
every listener says it accepts (a peer or a supervisor that trusts the line must not meet a
refused connection), restarts a listener that dies, and
runs what must run once: :class:`node.runtime.serve.NodeServices`, as a single-process node does (resume,
analysis pipeline, retention, web console). Each listener is a :class:`node.runtime.serve.Listener` on a
SO_REUSEPORT socket; listeners hand received instances to the broker themselves when it is enabled.

Use :func:`run_listeners` from ``cxrnode serve``, or run ``python -m node.runtime.listeners --config FILE``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path

from pynetdicom.transport import ThreadedAssociationServer

from node.analysis import decoding
from node.analysis.celery_app import make_celery
from node.analysis.handoff import Dispatcher, HandoffContext, leave_queued
from node.analysis.outbox import Publisher
from node.audit import AuditStore
from node.ingest.accept import Ingest
from node.ingest.spool import Spool
from node.runtime import metrics
from node.runtime.config import Settings, load_settings
from node.runtime.logging_setup import setup_logging
from node.runtime.serve import Listener, NodeServices, bootstrap, stop_on_signals
from node.runtime.supervisor import die_with_parent

log = logging.getLogger(__name__)

#: A listener target runs one receiving process until `stop` is set: (settings, index, stop, ready);
#: it calls `ready()` once its socket accepts connections.
ListenerTarget = Callable[[Settings, int, threading.Event, Callable[[], None]], None]

#: How long the parent waits for every listener to accept before it gives up starting.
READY_TIMEOUT_S = 120.0


class ReusePortAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server on a socket that shares its port with the other listeners."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (never listen) a SO_REUSEPORT socket: claims the port and resolves port 0.

    A bound socket that is not listening receives no connections, so the parent can hold it for as
    long as the listeners run; another program cannot take the port unless it also sets SO_REUSEPORT
    as the same user.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def metrics_folder(settings: Settings) -> Path:
    """Where listener processes leave their metrics for the parent's /metrics (`node.runtime.metrics`)."""
    return settings.storage.data_dir / "metrics" / "listeners"


def serve_listener(settings: Settings, index: int, stop: threading.Event, ready: Callable[[], None]) -> None:
    """The default listener: ingest + SCP on the shared port until `stop`, then a graceful end."""
    store = AuditStore.open(
        settings.database_url, echo=settings.database.echo, run_migrations=False, node=settings.node_name
    )
    # Publishing prepares pixels and talks to the broker: each listener does it for what it received.
    dispatcher = Dispatcher(
        HandoffContext(settings, store), Publisher(make_celery(settings)) if settings.broker.enabled else leave_queued
    )
    ingest = Ingest(settings, store, Spool(settings.storage.data_dir), dispatcher)
    listener = Listener(settings, ingest, server_class=ReusePortAssociationServer, name=f"listener{index}")
    metrics.reset_listener_metrics()
    snapshots = metrics.SnapshotWriter(metrics_folder(settings)).start()
    dispatcher.start()
    listener.start()
    log.info("listener %d (pid %d) accepting", index, os.getpid())
    ready()
    stop.wait()
    listener.stop()
    dispatcher.close()
    decoding.shutdown()
    snapshots.stop()
    store.close()
    log.info("listener %d stopped", index)


def _listener_process(target: ListenerTarget, settings: Settings, index: int, ready: Callable[[], None]) -> None:
    """Entry point of a forked listener: its own signal handling, then the target."""
    die_with_parent()
    target(settings, index, stop_on_signals(), ready)


class ListenerPool:
    """N forked listener processes; restarts one that dies (with backoff) until `stop`."""

    def __init__(
        self, settings: Settings, n: int, target: ListenerTarget = serve_listener, *, max_backoff_s: float = 60.0
    ) -> None:
        if n < 1:
            raise ValueError("a listener pool needs at least one listener")
        self.settings = settings
        self.n = n
        self.target = target
        self.max_backoff_s = max_backoff_s
        self._ctx = multiprocessing.get_context("fork")
        self._procs: list[BaseProcess | None] = [None] * n
        self._ready = [self._ctx.Event() for _ in range(n)]
        self._restarts = [0] * n
        self._next_start: dict[int, float] = {}

    def start(self) -> ListenerPool:
        for i in range(self.n):
            self._spawn(i)
        return self

    def _spawn(self, index: int) -> None:
        self._ready[index] = self._ctx.Event()
        proc = self._ctx.Process(
            target=_listener_process,
            args=(self.target, self.settings, index, self._ready[index].set),
            name=f"cxrnode-listener-{index}",
            daemon=False,
        )
        proc.start()
        self._procs[index] = proc
        log.info("started listener %d (pid %s)", index, proc.pid)

    def wait_ready(self, timeout_s: float) -> None:
        """Return once every listener accepts; RuntimeError if one exits first or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        for i, ready in enumerate(self._ready):
            while not ready.wait(0.1):
                proc = self._procs[i]
                if proc is not None and not proc.is_alive():
                    raise RuntimeError(f"listener {i} exited with status {proc.exitcode} before it accepted")
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"listener {i} did not accept within {timeout_s:.0f} s")

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None and p.pid is not None and p.is_alive()]

    def restarts(self) -> list[int]:
        return list(self._restarts)

    def check(self) -> None:
        """Restart listeners that exited (call periodically; backoff 1, 2, 4 … max_backoff_s)."""
        now = time.monotonic()
        for i, proc in enumerate(self._procs):
            if proc is None or proc.is_alive():
                continue
            if i not in self._next_start:
                delay = min(self.max_backoff_s, 2.0 ** min(self._restarts[i], 6))
                log.warning("listener %d exited with status %s; restarting in %.0f s", i, proc.exitcode, delay)
                self._next_start[i] = now + delay
            elif now >= self._next_start[i]:
                del self._next_start[i]
                self._restarts[i] += 1
                proc.close()
                self._spawn(i)

    def stop(self, grace_s: float) -> None:
        """SIGTERM every listener (each lets its associations finish), SIGKILL what outlives the grace."""
        live = [p for p in self._procs if p is not None and p.is_alive()]
        for p in live:
            p.terminate()
        deadline = time.monotonic() + grace_s + 5.0
        for p in live:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                log.warning("listener pid %s did not stop in %.0f s; killing it", p.pid, grace_s)
                p.kill()
                p.join(5)


def run_listeners(
    settings: Settings, n: int, target: ListenerTarget = serve_listener, *, stop: threading.Event | None = None
) -> int:
    """Run the node with `n` listener processes until SIGTERM/SIGINT (or `stop`); returns the exit status.

    The parent bootstraps (migrates, seeds the AE titles) before forking (the listeners open the
    database without migrating), then runs the node's services, the same as a single-process node.
    """
    d = settings.dicom
    reserved = reserve_port(d.host, d.port)
    port = int(reserved.getsockname()[1])
    settings = settings.model_copy(update={"dicom": d.model_copy(update={"port": port})})
    bootstrap(settings)  # no database connection crosses the fork
    metrics.aggregate_listeners(metrics_folder(settings))  # /metrics sums what every listener counted
    pool = ListenerPool(settings, n, target).start()
    stop = stop_on_signals(stop)
    services = NodeServices(settings)  # threads start only now, after the fork
    try:
        services.start()
        try:
            pool.wait_ready(READY_TIMEOUT_S)
        except RuntimeError as exc:
            log.error("not starting: %s", exc)
            return 1
        services.announce(port, listeners=n)
        services.run_until(stop, tick=pool.check)
    finally:
        pool.stop(d.shutdown_grace_s)
        reserved.close()
        services.stop()
        log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m node.runtime.listeners", description="Run the node with several listener processes on one port."
    )
    parser.add_argument("--config", required=True, help="node configuration file (TOML)")
    parser.add_argument(
        "-n",
        "--listeners",
        type=int,
        default=None,
        help="listener processes (default: dicom.listeners from the configuration)",
    )
    args = parser.parse_args(argv)
    settings = load_settings(args.config)
    setup_logging("INFO", json_logs=settings.web.json_logs)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return run_listeners(settings, args.listeners or settings.dicom.listeners)


if __name__ == "__main__":
    raise SystemExit(main())
