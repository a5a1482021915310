"""The node's side of the Celery queue: publishes `workers.analyze`, consumes `node.finish`.

The node cannot import `workers.tasks` (that module loads torch), so it keeps its own Celery app with
the same settings (`workers.api.celery_settings`) and the same embedded transport (`workers.broker`,
torch-free), and addresses the worker's task by name.
"""

from __future__ import annotations

import logging

from celery import Celery

from node.runtime.config import Settings
from workers import broker
from workers.api import celery_settings

log = logging.getLogger(__name__)


def broker_url_for(settings: Settings) -> str:
    return settings.broker_url


def make_celery(settings: Settings) -> Celery:
    app = Celery("cxrnode")
    url = broker_url_for(settings)
    # The embedded broker needs the same transport on both sides (fast polling, acked rows deleted).
    broker.prepare(url)
    app.conf.update(celery_settings(url, settings.broker.result_backend, settings.broker.lease_s))
    return app
