"""The embedded SQLite broker: acked rows are deleted, requeues reuse the row, stranded rows recover."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from kombu import Connection

from tests.support.redis import RedisServer
from workers import broker


def rows(db: Path) -> list[tuple[int, int, str]]:
    """(message id, visible, queue name) of every message row."""
    with sqlite3.connect(db) as con:
        return [
            (int(i), int(v), str(q))
            for i, v, q in con.execute(
                "SELECT m.id, m.visible, q.name FROM kombu_message m JOIN kombu_queue q ON q.id = m.queue_id "
                "ORDER BY m.id"
            )
        ]


def test_ack_deletes_and_requeue_keeps_the_row(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "broker.db"
    url = f"sqla+sqlite:///{db}"
    broker.prepare(url)  # also creates the folder
    with Connection(url) as conn:
        q = conn.SimpleQueue("inference")
        q.put({"n": 1})
        q.put({"n": 2})
        first = q.get(timeout=5)
        assert first.payload == {"n": 1}
        assert [r[1] for r in rows(db)] == [0, 1]  # delivered, not yet acked: invisible
        first.ack()
        assert [r[1] for r in rows(db)] == [1]  # acked: gone, the file does not grow

        second = q.get(timeout=5)
        ((row_id, _, _),) = rows(db)
        second.requeue()
        assert rows(db) == [(row_id, 1, "inference")]  # same row visible again, not a copy
        again = q.get(timeout=5)
        assert again.payload == {"n": 2}
        again.reject()  # not requeued: dropped
        assert rows(db) == []
        q.close()


def test_recover_unacked_only_touches_the_given_queues(tmp_path: Path) -> None:
    db = tmp_path / "broker.db"
    url = f"sqla+sqlite:///{db}"
    broker.prepare(url)
    assert broker.recover_unacked(url, ["inference"]) == 0  # no tables yet: nothing to do
    with Connection(url) as conn:
        for name in ("inference", "node"):
            conn.SimpleQueue(name).put({"q": name})
    # A consumer took both and died before acknowledging (its rows stay invisible).
    with sqlite3.connect(db) as con:
        con.execute("UPDATE kombu_message SET visible = 0")
    assert broker.recover_unacked(url, ["inference"]) == 1
    assert {(q, v) for _, v, q in rows(db)} == {("inference", 1), ("node", 0)}
    assert broker.recover_unacked("redis://127.0.0.1:1/0", ["inference"]) == 0  # not embedded: no-op


def test_sqlite_path() -> None:
    assert broker.sqlite_path("sqla+sqlite:////var/lib/cxr/broker.db") == Path("/var/lib/cxr/broker.db")
    assert broker.sqlite_path("sqla+sqlite:///var/broker.db") == Path("var/broker.db")
    assert broker.sqlite_path("sqla+sqlite://") is None
    assert broker.is_embedded("sqla+sqlite:///x.db") and not broker.is_embedded("redis://h:1/0")


def test_prepare_wins_over_a_stock_transport_resolved_earlier(tmp_path: Path) -> None:
    from kombu.transport import get_transport_cls

    get_transport_cls("sqla")  # e.g. a health check connected before the Celery app was made
    broker.prepare(f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    assert get_transport_cls("sqla") is broker.SqliteTransport


def test_broker_environment_uses_the_node_spelling_and_warns_on_the_old_one() -> None:
    from workers.api import broker_environment

    assert broker_environment({"CXRNODE_BROKER__URL": "redis://a/0"}) == ({"CXRNODE_BROKER__URL": "redis://a/0"}, [])
    values, warnings = broker_environment({"CXRNODE_BROKER_URL": "redis://old/0", "CXRNODE_TASK_TIME_LIMIT": "60"})
    assert values == {"CXRNODE_BROKER__URL": "redis://old/0", "CXRNODE_BROKER__TASK_TIME_LIMIT": "60"}
    assert [w.split(" ")[0] for w in warnings] == ["CXRNODE_BROKER_URL", "CXRNODE_TASK_TIME_LIMIT"]
    values, warnings = broker_environment(
        {"CXRNODE_BROKER__URL": "redis://new/0", "CXRNODE_BROKER_URL": "redis://old/0"}
    )
    assert values == {"CXRNODE_BROKER__URL": "redis://new/0"} and "ignored" in warnings[0]
    assert broker_environment({}) == ({}, [])


@pytest.mark.redis
def test_leases_keep_a_live_consumers_message_and_free_a_dead_ones(redis_server: RedisServer) -> None:
    """Issue 17, finding 2: a message held by a live worker stays invisible past the visibility timeout
    while its lease is renewed; once renewals stop (the whole worker died) another consumer takes it back."""
    import redis
    from kombu import Connection

    from workers.api import redis_transport_options
    from workers.broker import LeaseKeeper

    url = redis_server.url.rsplit("/", 1)[0] + "/6"
    redis.Redis.from_url(url).flushdb()
    lease = 4.0
    options = redis_transport_options(lease)
    with (
        Connection(url, transport_options=options) as holder_conn,
        Connection(url, transport_options=options) as other_conn,
    ):
        holder = holder_conn.SimpleQueue("inference")
        holder.put({"job": 1})
        held = holder.get(timeout=5)  # delivered, not acknowledged: the task is running
        keeper = LeaseKeeper(holder.consumer.channel, url, lease)
        other = other_conn.SimpleQueue("inference")
        sweep = other.consumer.channel.qos

        time.sleep(lease + 1)
        assert keeper.renew_once() == 1  # alive: renewed (every lease / 4 in the worker)
        sweep.restore_visible(num=10, interval=1)
        with pytest.raises(other.Empty):
            other.get(timeout=1)

        time.sleep(lease + 1)  # no renewal: the holder is dead
        sweep.restore_visible(num=10, interval=1)
        again = other.get(timeout=5)
        assert again.payload == {"job": 1}
        again.ack()
        assert held.delivery_tag not in holder.consumer.channel.qos._dirty
        keeper.client.close()
        holder.close()
        other.close()
