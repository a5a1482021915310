"""Tasks on the `node` queue, run by `celery -A node.analysis.tasks worker -Q node` (started by `cxrnode serve`).

`node.finish` takes a worker's AnalyzeResult, builds SEG + SR into the results folder and registers the
exports; the exporter in `cxrnode serve` delivers them. The task is idempotent: a result for an instance
that is no longer `queued` (a re-run after a worker died, say) is recorded and dropped, so a destination
never gets two result sets for one analysis.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from pathlib import Path
from typing import Any

from celery import signals

from node.analysis.celery_app import make_celery
from node.analysis.finish import finish_analysis
from node.audit import AuditStore, StoreError
from node.audit.models import parse_job_id
from node.runtime.config import Settings, find_config, load_settings
from workers import broker
from workers.api import FINISH_TASK, AnalyzeResult, node_queue

log = logging.getLogger(__name__)

#: `cxrnode serve` passes its validated settings to the worker it spawns, so both see one configuration:
#: in a file only the node's user reads (mode 0600), named here. Never the settings themselves in the
#: environment: they hold the console's password hashes, alert tokens and database credentials, and a
#: process's environment is readable in /proc and ends up in crash reports.
SETTINGS_FILE_ENV = "CXRNODE_SETTINGS_FILE"


def write_settings_file(settings: Settings) -> Path:
    """The settings as JSON in ``<data_dir>/run/node-worker-settings.json``, created 0600, replaced atomically."""
    folder = settings.storage.data_dir / "run"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / "node-worker-settings.json"
    tmp = folder / f".{path.name}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(settings.model_dump_json())
    os.replace(tmp, path)
    return path


@cache
def _settings() -> Settings:
    if path := os.environ.get(SETTINGS_FILE_ENV):
        return Settings.model_validate_json(Path(path).read_text())
    return load_settings(find_config())


@cache
def _store() -> AuditStore:
    # Loaded once per worker process; migrations are the serving node's job.
    return AuditStore.open(_settings().database_url, run_migrations=False, node=_settings().node_name)


app = make_celery(_settings())
# This worker holds `node.finish` messages on Redis like the inference workers hold theirs: renew them.
broker.keep_leases(_settings().broker_url, _settings().broker.lease_s)


@signals.worker_init.connect
def _recover_stranded(**_: Any) -> None:
    # Only this worker consumes this node's queue: rows a killed predecessor held are safe to requeue
    # (the shared `node` queue is left alone: another node's worker may hold its messages).
    broker.recover_unacked(str(app.conf.broker_url), [node_queue(_settings().node_name)])


@app.task(name=FINISH_TASK, acks_late=True, ignore_result=True)
def finish(message: dict[str, Any]) -> None:
    try:
        result = AnalyzeResult.from_message(message)
    except (KeyError, TypeError, ValueError) as e:
        # A malformed message will never become valid: log and drop it instead of looping.
        log.error("dropping malformed node.finish message: %s", e)
        return
    owner = _owner(result.job_id)
    if owner and owner != _store().node:
        # Another node received the image (a result from the shared queue): only it can build SEG and SR.
        log.info("job %s belongs to node %s: forwarded to its queue", result.job_id, owner or "(unnamed)")
        app.send_task(FINISH_TASK, args=[message], queue=node_queue(owner))
        return
    finish_analysis(_settings(), _store(), result)


def _owner(job_id: str) -> str | None:
    """The node holding the job's instance; None when the instance is unknown (finish records that)."""
    try:
        return _store().get_instance(parse_job_id(job_id)[0]).node
    except (StoreError, ValueError):
        return None
