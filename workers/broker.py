"""The embedded broker: kombu's SQLAlchemy transport on SQLite, made fit for unattended use.

Why SQLite through kombu: the embedded mode must run with no server, and one SQLite file beside the
audit DB is the least that can go wrong. Stock kombu has three gaps that matter here, fixed by the
subclass below (the on-disk tables are kombu's own, so a stock-kombu producer such as the node
interoperates with it):

1. It polls every second (1 s per hop); `polling_interval` must be set on the transport class (it
   cannot go in broker_transport_options: those are passed to `create_engine`, which rejects them).
2. A delivered message is only marked invisible and never deleted, so the file grows by every image
   ever sent. Here ack/reject delete the row, and a requeue makes the same row visible again.
3. A message delivered to a worker that then dies as a whole (power loss, kill -9 of the main
   process) stays invisible forever. With (2) every invisible row belongs to a live or a dead
   consumer, so `recover_unacked` makes them visible again when the embedded worker starts (tasks are
   idempotent: a duplicate from a still-running second worker costs compute, not correctness).

SQLite runs in WAL mode with a busy timeout so that the node (publisher) and the worker (consumer)
do not fail each other with "database is locked".

On Redis, a whole worker that dies is handled by leases instead (`LeaseKeeper`, see
`workers.api.DEFAULT_LEASE_S`): a short visibility timeout that every live consumer keeps renewing
for the messages it holds, so only a dead consumer's messages become visible again, within about a
minute, while a long task of a live one is never delivered twice.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from queue import Empty
from typing import Any

import kombu.transport as kombu_transport
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqla
from kombu.transport.virtual import Message
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads
from sqlalchemy import bindparam, create_engine, event, text

log = logging.getLogger(__name__)

#: Seconds between polls of an empty queue: ~64 ms round trip instead of ~1 s (DESIGN.md).
POLLING_INTERVAL = 0.05
SQLITE_BUSY_TIMEOUT_S = 30


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.close()


class Channel(kombu_sqla.Channel):
    """Deletes acknowledged messages; requeues by making the delivered row visible again."""

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        self._rows: dict[str, int] = {}  # delivery tag -> kombu_message.id of unacked deliveries
        # A prefork worker acks from its result-handler thread while the main thread polls; both use
        # this channel's one SQLAlchemy session, which must never be used by two threads at once.
        self._lock = threading.RLock()
        super().__init__(connection, **kwargs)

    def _get_or_create(self, queue: str) -> Any:
        with self._lock:
            return super()._get_or_create(queue)

    def _put(self, queue: Any, message: Any, **kwargs: Any) -> None:  # type: ignore[override]
        with self._lock:
            super()._put(queue, message, **kwargs)

    def _purge(self, queue: str) -> int:
        with self._lock:
            return int(super()._purge(queue))

    def _size(self, queue: str) -> int:
        with self._lock:
            return int(super()._size(queue))

    def _engine_from_config(self) -> Any:
        url = self.connection.client.hostname
        if not str(url).startswith("sqlite"):
            return super()._engine_from_config()
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine

    def _get(self, queue: str, timeout: Any = None) -> Any:
        with self._lock:
            return self._get_locked(queue)

    def _get_locked(self, queue: str) -> Any:
        # kombu's _get, keeping the row id so that ack/reject can find the row again.
        obj = self._get_or_create(queue)
        if self.session.bind.name == "sqlite":
            self.session.execute(text("BEGIN IMMEDIATE TRANSACTION"))
        try:
            msg = (
                self.session.query(self.message_cls)
                .with_for_update()
                .filter(self.message_cls.queue_id == obj.id)
                .filter(self.message_cls.visible != False)  # noqa: E712 (SQL expression)
                .order_by(self.message_cls.sent_at)
                .order_by(self.message_cls.id)
                .limit(1)
                .first()
            )
            if msg is None:
                raise Empty()
            msg.visible = False
            payload = loads(bytes_to_str(msg.payload))
            tag = payload.get("properties", {}).get("delivery_tag")
            if tag is not None:
                self._rows[tag] = msg.id
            return payload
        finally:
            self.session.commit()

    def _set_row(self, tag: str | None, visible: bool) -> bool:
        """Delete (visible=False) or re-show (True) the row of a delivery. False if unknown."""
        with self._lock:
            row = self._rows.pop(tag, None) if tag is not None else None
            if row is None:
                return False
            query = self.session.query(self.message_cls).filter(self.message_cls.id == row)
            try:
                if visible:
                    query.update({self.message_cls.visible: True}, synchronize_session=False)
                else:
                    query.delete(synchronize_session=False)
                self.session.commit()
            except Exception:
                # Leave the session usable; the row stays invisible and is recovered at the next start.
                self.session.rollback()
                raise
            return True

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        super().basic_ack(delivery_tag, multiple=multiple)
        self._set_row(delivery_tag, visible=False)

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        super().basic_reject(delivery_tag, requeue=requeue)
        if not requeue:
            self._set_row(delivery_tag, visible=False)

    def _restore(self, message: Message) -> None:
        # Requeue (reject with requeue, unacked at shutdown): show the original row again, so
        # the message keeps its place and is not duplicated.
        tag = message.delivery_tag
        if not self._set_row(tag, visible=True):
            super()._restore(message)

    def _restore_at_beginning(self, message: Message) -> None:
        self._restore(message)


def _forget_engines_after_fork() -> None:
    # kombu caches engines on the Channel class; a forked pool process must not reuse the parent's
    # SQLite connections (SQLite forbids carrying a connection across fork: locks get confused).
    for engine, _session in list(kombu_sqla.Channel._engines.values()):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_engines_after_fork)


class SqliteTransport(kombu_sqla.Transport):
    Channel = Channel
    polling_interval = POLLING_INTERVAL


def is_embedded(url: str) -> bool:
    return url.startswith("sqla+sqlite:")


def sqlite_path(url: str) -> Path | None:
    """Database file of a `sqla+sqlite:///path` URL (None for in-memory)."""
    rest = url.split("sqlite:///", 1)[1] if "sqlite:///" in url else ""
    return Path(rest) if rest and rest != ":memory:" else None


def prepare(url: str) -> None:
    """Make `url` usable in this process: for the embedded broker, our transport and its folder."""
    if not url.startswith("sqla+"):
        return
    TRANSPORT_ALIASES["sqla"] = f"{__name__}:SqliteTransport"
    # kombu caches the class per alias: drop a stock transport resolved before this call.
    kombu_transport._transport_cache.pop("sqla", None)
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)


def recover_unacked(url: str, queues: list[str]) -> int:
    """Make messages delivered to a consumer that died visible again; returns how many.

    Call only while no other consumer of `queues` is running (the embedded worker at start).
    """
    if not is_embedded(url):
        return 0
    engine = create_engine(url.split("+", 1)[1], connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
    try:
        with engine.begin() as conn:
            tables = {r[0] for r in conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'"))}
            if not {"kombu_queue", "kombu_message"} <= tables:
                return 0
            stmt = text(
                "UPDATE kombu_message SET visible = 1 WHERE visible = 0 AND queue_id IN "
                "(SELECT id FROM kombu_queue WHERE name IN :names)"
            ).bindparams(bindparam("names", expanding=True))
            count = conn.execute(stmt, {"names": queues}).rowcount
    finally:
        engine.dispose()
    if count:
        log.warning("recovered %d message(s) left unacknowledged by a dead worker in %s", count, queues)
    return int(count or 0)


class LeaseKeeper:
    """In a Celery worker's main process on Redis: renew the visibility of the messages it holds.

    kombu's Redis transport keeps each delivered, unacknowledged message in a sorted set scored by its
    delivery time; any consumer's restore sweep puts back those older than the visibility timeout.
    Every `lease_s / 4` this thread sets the score of this consumer's own deliveries to now (ZADD XX:
    never re-adds a message acknowledged meanwhile), so they stay invisible while the worker lives.
    """

    def __init__(self, channel: Any, url: str, lease_s: float) -> None:
        import redis

        self.channel = channel
        self.interval_s = lease_s / 4
        self.key = channel.qos.unacked_index_key
        self.client = redis.Redis.from_url(
            url, socket_timeout=max(1.0, self.interval_s), socket_connect_timeout=max(1.0, self.interval_s)
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-lease", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        log.info("renewing broker leases every %.0f s", self.interval_s)
        return self

    def held(self) -> list[str]:
        """Delivery tags this consumer holds (delivered, not yet acknowledged)."""
        qos = self.channel.qos
        for _ in range(3):
            try:
                return [t for t in list(qos._delivered) if t not in qos._dirty]
            except RuntimeError:  # changed by the event loop while copied: try again
                continue
        return []

    def renew_once(self) -> int:
        tags = self.held()
        if tags:
            now = time.time()
            self.client.zadd(self.key, {tag: now for tag in tags}, xx=True)
        return len(tags)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.renew_once()
            except Exception as e:  # noqa: BLE001 — Redis away: the next round tries again
                log.warning("could not renew broker leases: %s", e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()


def keep_leases(url: str, lease_s: float) -> None:
    """Run a `LeaseKeeper` in this Celery worker once it consumes (Redis brokers only)."""
    if not url.startswith(("redis://", "rediss://")):
        return
    from celery import signals

    keepers: list[LeaseKeeper] = []

    def _start(sender: Any = None, **_: Any) -> None:
        channel = getattr(getattr(sender, "task_consumer", None), "channel", None)
        if channel is None or not hasattr(channel, "qos"):
            log.warning("no task consumer channel: broker leases are not renewed (a long task may run twice)")
            return
        keepers.append(LeaseKeeper(channel, url, lease_s).start())

    def _stop(**_: Any) -> None:
        while keepers:
            keepers.pop().stop()

    signals.worker_ready.connect(_start, weak=False)
    signals.worker_shutdown.connect(_stop, weak=False)
