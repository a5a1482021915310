"""The analysis half of `cxrnode serve`: outbox publisher, sweeper, exporter and the supervised workers.

    queued ──Publisher──▶ broker ──▶ workers.analyze ──▶ node.finish (node-queue worker) ──▶ analyzed
    analyzed ──Exporter──▶ destinations ──▶ exported | dead

Embedded mode (no broker URL configured) also runs a local CPU inference worker; in production the
inference workers run on GPU hosts (`celery -A workers.tasks worker -Q inference`).
"""

from __future__ import annotations

import logging
import os
import sys

from node.analysis.celery_app import broker_url_for, make_celery
from node.analysis.handoff import Dispatcher
from node.analysis.outbox import Publisher, Sweeper
from node.analysis.tasks import SETTINGS_FILE_ENV, write_settings_file
from node.audit import AuditStore
from node.export.exporter import Exporter
from node.runtime.config import Settings
from node.runtime.supervisor import ChildSpec, Supervisor
from workers.api import (
    BROKER_ENV,
    INFERENCE_QUEUE,
    LEASE_ENV,
    MODEL_NAMES,
    NODE_QUEUE,
    RESULT_BACKEND_ENV,
    TIME_LIMIT_ENV,
    node_queue,
)

log = logging.getLogger(__name__)


def enabled_models(settings: Settings) -> list[str]:
    return [name for name in MODEL_NAMES if getattr(settings.models, name)]


#: Worker options for children `cxrnode serve` supervises: no gossip, mingle or heartbeat chatter.
QUIET = ("--without-gossip", "--without-mingle", "--without-heartbeat")


def inference_worker_command(
    settings: Settings, *, concurrency: int, pool: str = "prefork", hostname: str = "", quiet: bool = False
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of an inference worker on the node's broker: the one definition
    for `cxrnode worker` (a GPU host) and the embedded worker `cxrnode serve` supervises.
    `hostname` is Celery's node name (`%h` = host name): two workers on one host need different ones."""
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.tasks",
        "worker",
        "-Q",
        INFERENCE_QUEUE,
        "-c",
        str(concurrency),
        "--pool",
        pool,
        "--loglevel",
        "INFO",
        *(["--hostname", hostname] if hostname else []),
        *(QUIET if quiet else ()),
    ]
    env = {
        BROKER_ENV: broker_url_for(settings),
        RESULT_BACKEND_ENV: settings.broker.result_backend,
        TIME_LIMIT_ENV: str(settings.broker.task_time_limit),
        LEASE_ENV: str(settings.broker.lease_s),
        "CXRNODE_WORKER_MODELS": ",".join(enabled_models(settings)),
    }
    return argv, env


def worker_children(settings: Settings) -> list[ChildSpec]:
    """The node-queue worker (always) and, in embedded mode, one local inference worker."""
    logs = settings.storage.data_dir / "logs"
    quiet = [*QUIET, "--loglevel", "INFO"]
    children = [
        ChildSpec(
            "node-worker",
            # This node's own result queue, and the shared one that results of older workers reach.
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "node.analysis.tasks",
                "worker",
                "-Q",
                f"{node_queue(settings.node_name)},{NODE_QUEUE}",
                "-c",
                "1",
                "--pool",
                "solo",
                "-n",
                f"node-{settings.node_name}@%h",
                *quiet,
            ],
            env={SETTINGS_FILE_ENV: str(write_settings_file(settings))},  # the broker URL comes with the settings
            log_file=logs / "node-worker.log",
        )
    ]
    if settings.embedded and settings.broker.embedded_worker:
        argv, env = inference_worker_command(
            settings, concurrency=settings.broker.worker_concurrency, hostname="inference@%h", quiet=True
        )
        # One intra-op thread: the node shares the cores, and oversubscribed OpenMP/ORT pools ran
        # 2x (ONNX) to 10x (torch) slower here (bench-results/worker.json).
        env["CXRNODE_WORKER_THREADS"] = os.environ.get("CXRNODE_WORKER_THREADS", "1")
        children.append(ChildSpec("inference-worker", argv, env=env, log_file=logs / "inference-worker.log"))
    return children


class Pipeline:
    def __init__(self, settings: Settings, store: AuditStore, *, start_workers: bool = True) -> None:
        self.settings = settings
        self.store = store
        self.app = make_celery(settings)
        self.publisher = Publisher(self.app)
        self.exporter = Exporter(settings, store)
        self.supervisor = Supervisor(worker_children(settings)) if start_workers else None
        self.sweeper: Sweeper | None = None

    def sweep_for(self, dispatcher: Dispatcher) -> None:
        """Sweep what the ingest dispatcher (which publishes with `self.publisher`) could not publish."""
        self.sweeper = Sweeper(self.store, dispatcher, self.publisher)

    def start(self) -> None:
        if self.supervisor is not None:
            self.supervisor.start()
        if self.sweeper is not None:
            self.sweeper.start()
        self.exporter.start()
        log.info("analysis pipeline started (broker %s)", "embedded" if self.settings.embedded else "external")

    def stop(self) -> None:
        if self.sweeper is not None:
            self.sweeper.stop()
        self.exporter.stop()
        if self.supervisor is not None:
            self.supervisor.stop()
