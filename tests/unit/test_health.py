"""Readiness checks against real things: a SQLite DB, the embedded broker, a closed port, the disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine

from node.runtime.config import Settings, load_settings
from node.runtime.health import (
    check_broker,
    check_database,
    check_spool,
    check_workers,
    queue_depth,
    readiness,
    supervised_workers_probe,
)
from tests.support.net import free_port
from tests.support.redis import RedisServer


def _settings(tmp_path: Path, min_free_mb: int = 1) -> Settings:
    return load_settings(None, storage={"data_dir": str(tmp_path), "min_free_mb": min_free_mb})


def test_ready_on_sqlite_and_the_embedded_broker(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    result = readiness(s, create_engine(s.database_url))
    checks = {c.name: c for c in result.checks}
    assert result.ready and all(checks[n].ok for n in ("database", "broker", "spool"))
    assert not checks["workers"].critical
    assert queue_depth(s.broker_url, "inference") == 0


def test_unreachable_broker_and_database_fail_fast(tmp_path: Path) -> None:
    closed = free_port()
    broker = check_broker(f"redis://127.0.0.1:{closed}/0", timeout=1.0)
    assert not broker.ok and broker.critical
    assert queue_depth(f"redis://127.0.0.1:{closed}/0", "inference", timeout=1.0) is None
    db = check_database(
        create_engine(f"postgresql+psycopg://u@127.0.0.1:{closed}/x", connect_args={"connect_timeout": 2})
    )
    assert not db.ok and "OperationalError" in db.detail
    workers = check_workers(f"redis://127.0.0.1:{closed}/0", timeout=0.5)
    assert not workers.ok and not workers.critical


def test_broker_password_is_not_shown(tmp_path: Path) -> None:
    result = check_broker(f"redis://:s3cret@127.0.0.1:{free_port()}/0", timeout=0.5)
    assert "s3cret" not in result.detail


def test_spool_below_watermark_is_not_ready(tmp_path: Path) -> None:
    s = _settings(tmp_path, min_free_mb=10**9)
    spool = check_spool(s)
    assert not spool.ok and "below" in spool.detail and spool.data["min_free_mb"] == 10**9
    assert not readiness(s, create_engine(s.database_url)).ready


def test_supervised_workers_probe_reports_dead_children() -> None:
    alive: dict[str, int] = {"worker-1": 101}
    probe = supervised_workers_probe(["worker-1", "worker-2"], lambda: dict(alive), lambda: {"worker-2": 3})
    result = probe()
    assert not result.ok and not result.critical and "worker-2" in result.detail
    alive["worker-2"] = 102
    assert probe().ok and "3 restart(s)" in probe().detail


@pytest.mark.redis
def test_queue_depth_on_redis_is_zero_when_empty_not_unknown(redis_server: RedisServer) -> None:
    """Issue 17, finding 9: the gauge must not vanish when the queue is empty (the alert watches it)."""
    from kombu import Connection

    from workers.api import celery_settings

    url = redis_server.url.rsplit("/", 1)[0] + "/5"  # a database of its own on the session's server
    assert queue_depth(url, "inference") == 0
    options = celery_settings(url)["broker_transport_options"]
    with Connection(url, transport_options=options) as conn:
        queue = conn.SimpleQueue("inference")
        queue.put({"job": 1}, priority=9)
        queue.put({"job": 2}, priority=0)
        assert queue_depth(url, "inference") == 2  # summed over the priority lists
        queue.get(timeout=5).ack()
        queue.get(timeout=5).ack()
        queue.close()
    assert queue_depth(url, "inference") == 0
