"""Tasks on the `node` queue, run by `celery -A node.tasks worker -Q node` (started by `cxrnode serve`).

`node.finish` takes a worker's AnalyzeResult, builds SEG + SR into the results folder and registers the
exports; the exporter in `cxrnode serve` delivers them. The task is idempotent: a result for an instance
that is no longer `queued` (a re-run after a worker died, say) is recorded and dropped, so a destination
never gets two result sets for one analysis.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from typing import Any

from celery import signals

from node.audit import AuditStore
from node.celery_app import make_celery
from node.config import Settings, find_config, load_settings
from node.finish import finish_analysis
from workers import broker
from workers.api import FINISH_TASK, NODE_QUEUE, AnalyzeResult

log = logging.getLogger(__name__)

#: `cxrnode serve` passes its validated settings to the worker it spawns, so both see one configuration.
SETTINGS_JSON_ENV = "CXRNODE_SETTINGS_JSON"


@cache
def _settings() -> Settings:
    if raw := os.environ.get(SETTINGS_JSON_ENV):
        return Settings.model_validate_json(raw)
    return load_settings(find_config())


@cache
def _store() -> AuditStore:
    # Loaded once per worker process; migrations are the serving node's job.
    return AuditStore.open(_settings().database_url, run_migrations=False)


app = make_celery(_settings())
# This worker holds `node.finish` messages on Redis like the inference workers hold theirs: renew them.
broker.keep_leases(_settings().broker_url, _settings().broker.lease_s)


@signals.worker_init.connect
def _recover_stranded(**_: Any) -> None:
    # Only this worker consumes the node queue: rows a killed predecessor held are safe to requeue.
    broker.recover_unacked(str(app.conf.broker_url), [NODE_QUEUE])


@app.task(name=FINISH_TASK, acks_late=True, ignore_result=True)
def finish(message: dict[str, Any]) -> None:
    try:
        result = AnalyzeResult.from_message(message)
    except (KeyError, TypeError, ValueError) as e:
        # A malformed message will never become valid: log and drop it instead of looping.
        log.error("dropping malformed node.finish message: %s", e)
        return
    finish_analysis(_settings(), _store(), result)
