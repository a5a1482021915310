"""`cxrnode serve`: open the audit log, resume unfinished work, listen for DICOM, stop gracefully.

One listener process for now. The pieces (store, spool, ingest, SCP) are per process and share only
the database and the spool directory, so ``dicom.listeners`` > 1 can later fork N of these on one
SO_REUSEPORT socket without changing them.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from node.audit import AuditStore
from node.config import Settings
from node.handoff import Dispatcher, HandoffContext
from node.health import CheckResult, supervised_workers_probe
from node.ingest import Ingest
from node.pipeline import Pipeline
from node.retention import RetentionLoop
from node.scp import StorageSCP
from node.spool import Spool
from node.web.server import WebServer, start_console

log = logging.getLogger(__name__)


class Node:
    """The running node: audit store, spool, ingest pipeline, hand-off dispatcher and DICOM listener."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = AuditStore.open(settings.database_url, echo=settings.database.echo)
        self.spool = Spool(settings.storage.data_dir)
        self.dispatcher = Dispatcher(HandoffContext(settings, self.store))
        self.ingest = Ingest(settings, self.store, self.spool, self.dispatcher)
        self.scp = StorageSCP(settings, self.store, self.ingest)
        self.pipeline = Pipeline(settings, self.store) if settings.broker.enabled else None
        if self.pipeline is not None:
            self.pipeline.attach(self.dispatcher)
        self.retention = RetentionLoop(settings, self.store)
        self.web: WebServer | None = None

    def start(self) -> None:
        self.spool.prepare()
        added = self.store.seed_ae(self.settings.ae, actor="config")
        if added:
            log.info("added %d AE title(s) from the configuration", added)
        self.dispatcher.start()
        if self.pipeline is not None:
            self.pipeline.start()
        self.ingest.resume_pending()
        self.retention.start()
        # Before the DICOM port is bound: a production config without a console password stops here.
        self.web = start_console(self.settings, self.store, enqueue_analysis=self.dispatcher.submit,
                                 kick_sender=self.pipeline.exporter.wake if self.pipeline else None,
                                 workers_probe=self._workers_probe())
        self.scp.start()
        self.store.add_event("node.started", detail={"ae_title": self.settings.dicom.ae_title,
                                                     "port": self.scp.port})

    def _workers_probe(self) -> Callable[[], CheckResult] | None:
        """Embedded mode: the supervised local workers; with a broker server, Celery's own ping."""
        sup = self.pipeline.supervisor if self.pipeline is not None else None
        if sup is None or not self.settings.embedded:
            return None
        return supervised_workers_probe([c.name for c in sup.children], sup.pids, sup.restarts)

    def sweep(self) -> None:
        """Housekeeping: drop partial files of transfers that were aborted (no longer being written)."""
        d = self.settings.dicom
        try:
            self.spool.sweep_incoming(max_age_s=max(d.network_timeout, d.dimse_timeout) * 2)
        except OSError:
            log.exception("sweeping %s failed", self.spool.incoming)

    def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, let in-flight associations finish (up to the grace period), flush hand-offs."""
        grace = self.settings.dicom.shutdown_grace_s if grace_s is None else grace_s
        self.scp.stop()
        if self.web is not None:
            self.web.stop()
        self.retention.stop()
        deadline = time.monotonic() + grace
        while (n := self.scp.active_associations()) and time.monotonic() < deadline:
            log.info("waiting for %d association(s) to finish", n)
            time.sleep(0.2)
        if n := self.scp.active_associations():
            log.warning("stopping with %d association(s) still open after %.0f s", n, grace)
        self.dispatcher.close()
        if self.pipeline is not None:
            self.pipeline.stop()
        self.store.add_event("node.stopped")
        self.store.close()


SWEEP_INTERVAL_S = 60.0


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status."""
    if settings.dicom.listeners > 1:
        # Several receiving processes on one port: one interpreter receives about one core's worth.
        from node.listeners import run_listeners

        return run_listeners(settings, settings.dicom.listeners)
    node = Node(settings)
    stopping = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    node.start()
    next_sweep = time.monotonic() + SWEEP_INTERVAL_S
    while not stopping.wait(1.0):
        if time.monotonic() >= next_sweep:
            node.sweep()
            next_sweep = time.monotonic() + SWEEP_INTERVAL_S
    node.stop()
    log.info("stopped")
    return 0
