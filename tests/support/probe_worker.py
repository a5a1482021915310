"""A minimal Celery worker app (no tasks, no torch) to give health checks a real worker to find.

Run: CXRNODE_PROBE_BROKER=redis://… celery -A tests.support.probe_worker worker -Q inference --pool solo
"""

from __future__ import annotations

import os

from celery import Celery

from workers.api import celery_settings

app = Celery("probe")
app.conf.update(celery_settings(os.environ["CXRNODE_PROBE_BROKER"]))
