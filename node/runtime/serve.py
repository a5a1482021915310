"""`cxrnode serve`: open the audit log, resume unfinished work, listen for DICOM, stop gracefully.

A node is two parts:

- :class:`NodeServices`, what runs once per node: the hand-off dispatcher and the analysis pipeline
  (publisher, sweeper, exporter, supervised workers), resuming unfinished instances, retention, the
  web console, STOW-RS ingest (its own HTTP port, through the services' ingest) and the spool sweeps;
- :class:`Listener`, the receiving part: ingest and the Storage SCP on the DICOM port.

With ``dicom.listeners = 1`` (:class:`Node`) both run in one process and the listener shares the
services' store and dispatcher. With more, :mod:`node.runtime.listeners` runs the services in the parent and
forks one :class:`Listener` per process on a SO_REUSEPORT socket. They share only the audit database
and the spool directory, as the processes of one node do. Two nodes (two hosts, or two data
directories) may share one database too: each acts on its own rows only (``node.name``, see
docs/operations.md, "Two nodes").
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from pynetdicom.transport import ThreadedAssociationServer

from node.alerts.deliver import Alerter
from node.analysis import decoding
from node.analysis.handoff import Dispatcher, HandoffContext, leave_queued
from node.analysis.pipeline import Pipeline
from node.audit import AuditStore
from node.dicomweb.stow import StowServer, start_stow
from node.ingest.accept import Ingest
from node.ingest.scp import StorageSCP
from node.ingest.spool import Spool
from node.runtime.config import Settings
from node.runtime.health import CheckResult, supervised_workers_probe
from node.runtime.retention import RetentionLoop
from node.triage.engine import TriageEngine
from node.triage.priors import PriorFetcher
from node.web.server import WebServer, start_console

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 60.0


def bootstrap(settings: Settings) -> None:
    """Once per start, before any listener or thread: migrate the audit schema, make the spool folders,
    add the configuration's AE titles. Leaves no database connection open (listeners fork after it)."""
    store = AuditStore.open(settings.database_url, echo=settings.database.echo, node=settings.node_name)
    try:
        Spool(settings.storage.data_dir).prepare()
        # Rows from before node identity whose files are on this disk are this node's to finish.
        if adopted := store.adopt_local_rows(os.path.exists):
            log.info(
                "node %s: took over %d instance(s) recorded before node names, whose files are here",
                settings.node_name,
                adopted,
            )
        added = store.seed_ae(settings.ae, actor="config")
        if added:
            log.info("added %d AE title(s) from the configuration", added)
    finally:
        store.close()


def stop_on_signals(stop: threading.Event | None = None) -> threading.Event:
    """An event that SIGTERM/SIGINT set (handlers are installed only from the main thread)."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():

        def _on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s: stopping", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    return stop


class Listener:
    """Ingest + Storage SCP on the DICOM port; `stop` lets the associations in flight finish."""

    def __init__(
        self,
        settings: Settings,
        ingest: Ingest,
        *,
        server_class: type[ThreadedAssociationServer] = ThreadedAssociationServer,
        name: str = "listener",
    ) -> None:
        self.settings = settings
        self.ingest = ingest
        self.scp = StorageSCP(settings, ingest.store, ingest)
        self.server_class = server_class
        self.name = name

    @property
    def port(self) -> int:
        return self.scp.port

    def start(self) -> None:
        self.scp.start(self.server_class, thread_name=f"AcceptorServer-{self.name}")

    def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, then wait up to the grace period for the associations in flight."""
        grace = self.settings.dicom.shutdown_grace_s if grace_s is None else grace_s
        self.scp.stop()
        deadline = time.monotonic() + grace
        while (n := self.scp.active_associations()) and time.monotonic() < deadline:
            log.info("%s: waiting for %d association(s) to finish", self.name, n)
            time.sleep(0.2)
        if n := self.scp.active_associations():
            log.warning("%s: stopping with %d association(s) still open after %.0f s", self.name, n, grace)


class NodeServices:
    """What a node runs once, however many listeners receive for it (see the module docstring).

    Expects :func:`bootstrap` to have run. ``ingest`` is the node's ingest (resume, console re-runs);
    a listener in the same process receives through it.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = AuditStore.open(
            settings.database_url, echo=settings.database.echo, run_migrations=False, node=settings.node_name
        )
        self.spool = Spool(settings.storage.data_dir)
        self.pipeline = Pipeline(settings, self.store) if settings.broker.enabled else None
        self.dispatcher = Dispatcher(
            HandoffContext(settings, self.store), self.pipeline.publisher if self.pipeline is not None else leave_queued
        )
        self.ingest = Ingest(settings, self.store, self.spool, self.dispatcher)
        if self.pipeline is not None:
            self.pipeline.sweep_for(self.dispatcher)
        self.retention = RetentionLoop(settings, self.store)
        # Study-level triage and its alerts; off with triage.enabled = false (results are still sent).
        self.alerter = Alerter(settings, self.store) if settings.triage.enabled else None
        self.priors = PriorFetcher(settings, self.store) if self.alerter is not None else None
        self.triage = (
            TriageEngine(settings, self.store, on_alerts=self.alerter.wake, priors=self.priors)
            if self.alerter is not None
            else None
        )
        self.web: WebServer | None = None
        self.stow: StowServer | None = None
        self._running = False

    def start(self) -> None:
        self.dispatcher.start()
        if self.pipeline is not None:
            self.pipeline.start()
        self._running = True
        self.ingest.resume_pending()
        self.retention.start()
        if self.triage is not None and self.alerter is not None and self.priors is not None:
            self.alerter.start()
            self.priors.start()
            self.triage.start()
        # Before the DICOM port is bound: a production config without a console password stops here.
        self.web = start_console(
            self.settings,
            self.store,
            enqueue_analysis=self.dispatcher.submit,
            kick_sender=self.pipeline.exporter.wake if self.pipeline else None,
            workers_probe=self._workers_probe(),
        )
        if self.settings.dicomweb.enabled:
            self.stow = start_stow(self.settings, self.ingest)

    def announce(self, port: int, listeners: int) -> None:
        self.store.add_event(
            "node.started",
            detail={
                "ae_title": self.settings.dicom.ae_title,
                "port": port,
                "listeners": listeners,
                "node": self.settings.node_name,
            },
        )
        log.info(
            "node %s (%s) running on %s:%d (%d listener process%s)",
            self.settings.node_name,
            self.settings.dicom.ae_title,
            self.settings.dicom.host,
            port,
            listeners,
            "" if listeners == 1 else "es",
        )

    def run_until(self, stop: threading.Event, tick: Callable[[], None] | None = None) -> None:
        """Every second call `tick` (e.g. the listener pool's check) until `stop`; sweep the spool now and then."""
        next_sweep = time.monotonic() + SWEEP_INTERVAL_S
        while not stop.wait(1.0):
            if tick is not None:
                tick()
            if time.monotonic() >= next_sweep:
                self.sweep()
                next_sweep = time.monotonic() + SWEEP_INTERVAL_S

    def sweep(self) -> None:
        """Housekeeping: drop partial files of transfers that were aborted (no longer being written)."""
        d = self.settings.dicom
        try:
            self.spool.sweep_incoming(max_age_s=max(d.network_timeout, d.dimse_timeout) * 2)
        except OSError:
            log.exception("sweeping %s failed", self.spool.incoming)

    def stop(self) -> None:
        """Stop the console and retention, flush the hand-offs, stop the pipeline (call after the listeners)."""
        if self.stow is not None:
            self.stow.stop()
        if self.web is not None:
            self.web.stop()
        self.retention.stop()
        if self.triage is not None and self.alerter is not None and self.priors is not None:
            self.triage.stop()
            self.priors.stop()
            self.alerter.stop()
        if self._running:
            self.dispatcher.close()
            if self.pipeline is not None:
                self.pipeline.stop()
            self.store.add_event("node.stopped")
        decoding.shutdown()
        self.store.close()

    def _workers_probe(self) -> Callable[[], CheckResult] | None:
        """Embedded mode: the supervised local workers; with a broker server, Celery's own ping."""
        sup = self.pipeline.supervisor if self.pipeline is not None else None
        if sup is None or not self.settings.embedded:
            return None
        return supervised_workers_probe([c.name for c in sup.children], sup.pids, sup.restarts)


class Node:
    """The single-process node: the services and one listener sharing their store and dispatcher."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.services = NodeServices(settings)
        self.listener = Listener(settings, self.services.ingest)

    def start(self) -> None:
        bootstrap(self.settings)
        self.services.start()
        self.listener.start()
        self.services.announce(self.listener.port, listeners=1)

    def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, let in-flight associations finish (up to the grace period), then the services."""
        self.listener.stop(grace_s)
        self.services.stop()


#: Files the node writes hold PHI or credentials: owner read/write, group read, nothing for others.
FILE_UMASK = 0o027


def restrict_file_modes(settings: Settings) -> None:
    """Whatever umask the node was started with: new files 0640, folders 0750 (the spool's temporary
    files are 0600 already), and the databases and folders an earlier start made are tightened too."""
    os.umask(FILE_UMASK)
    data = settings.storage.data_dir
    for folder in (data, data / "spool", data / "quarantine", data / "results", data / "logs"):
        if folder.is_dir():
            folder.chmod(folder.stat().st_mode & 0o750)
    for pattern in ("audit.db*", "broker.db*"):
        for f in data.glob(pattern):
            f.chmod(f.stat().st_mode & 0o640)


def run_single(settings: Settings) -> int:
    """One process receives and runs the services, until SIGTERM/SIGINT; returns the exit status."""
    stop = stop_on_signals()
    node = Node(settings)
    try:
        node.start()
        node.services.run_until(stop)
    finally:
        node.stop()
        log.info("stopped")
    return 0
