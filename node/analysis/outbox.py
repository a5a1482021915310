"""Sending queued instances to the workers: the outbox between the audit log and the broker.

The audit log is the source of truth: an instance is `queued` until its result comes back. `publish`
prepares the pixels (no PHI leaves: the message holds pixels and an opaque job id), keeps where the
model grid lies on the source with the instance (so `node.finish` need not decode the source again)
and sends the `workers.analyze` task. If the broker is unreachable the instance simply stays `queued`
and the sweeper publishes it again once the broker answers; a result that arrives twice is dropped by
`node.finish` (job ids are per run), so nothing is lost and nothing is delivered twice.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from celery import Celery

from node.analysis.decoding import prepare_isolated
from node.analysis.handoff import Dispatcher, HandoffContext
from node.analysis.prepare import PrepareError
from node.audit import AuditStore, InstanceFilter, InstanceState
from node.audit.models import as_utc, utcnow
from node.runtime.config import Settings
from workers.api import ANALYZE_TASK, INFERENCE_QUEUE, AnalyzeRequest, node_queue, task_priority

log = logging.getLogger(__name__)


class Publisher:
    """The hand-off function for `node.analysis.handoff.Dispatcher`: prepare, then publish one instance."""

    def __init__(self, app: Celery, *, republish_after_s: float = 1800.0, max_publishes: int = 3) -> None:
        self.app = app
        # A job with no result this long after its publish is sent again (a lost message, a task killed
        # by its time limit); after `max_publishes` sends the instance is failed instead of looping.
        self.republish_after_s = republish_after_s
        self.max_publishes = max_publishes
        self._published: dict[str, float] = {}  # job id -> monotonic time of the last successful publish
        self._sends: dict[str, int] = {}  # job id -> successful publishes
        self._lock = threading.Lock()

    def __call__(self, ctx: HandoffContext, instance_id: int) -> None:
        self.publish(ctx.settings, ctx.store, instance_id)

    def remember(self, job_id: str) -> None:
        """A publish of `job_id` made by another process (from the audit log): not due until it ages."""
        with self._lock:
            self._published.setdefault(job_id, time.monotonic())

    def due(self, job_id: str) -> bool:
        with self._lock:
            at = self._published.get(job_id)
        return at is None or time.monotonic() - at > self.republish_after_s

    def publish(self, settings: Settings, store: AuditStore, instance_id: int) -> bool:
        inst = store.get_instance(instance_id)
        if inst.state != InstanceState.QUEUED:
            return False
        if inst.node != store.node:
            # Another node received it: only that node can read its image (its sweeper publishes it).
            log.info("instance %d belongs to node %s: left to it", instance_id, inst.node or "(unnamed)")
            return False
        job_id = inst.job_id
        if not self.due(job_id):
            return False
        if self._sends.get(job_id, 0) >= self.max_publishes:
            store.set_instance_state(
                instance_id,
                InstanceState.FAILED,
                f"no analysis result after {self.max_publishes} attempts "
                f"({self.republish_after_s:.0f} s each): check the inference workers",
            )
            return False
        try:
            prepared = prepare_isolated(settings, inst.spool_path)
        except PrepareError as e:
            store.set_instance_state(instance_id, InstanceState.FAILED, f"cannot prepare pixels: {e}")
            return False
        except OSError as e:
            store.set_instance_state(instance_id, InstanceState.FAILED, f"spool file unreadable: {e}")
            return False
        except Exception as e:  # MemoryError, a bug: maybe not the file's fault, so tried again (bounded)
            log.exception("preparing instance %d failed", instance_id)
            store.record_prepare_error(job_id, f"{type(e).__name__}: {e}", max_attempts=settings.prepare.max_attempts)
            return False
        # Before the publish: the result may come back at once, and node.finish maps its masks with this.
        if (inst.prepared_geometry or {}).get("job_id") != job_id and not store.record_job_geometry(
            job_id, prepared.geometry.to_json()
        ):
            return False  # the run ended (re-queued, failed) while the pixels were prepared
        request = AnalyzeRequest.build(
            job_id,
            prepared.pixels,
            tuple(inst.models),
            zone_threshold=settings.models.severity_zone_threshold,
            reply_queue=node_queue(store.node),
        )
        started = time.monotonic()
        self.app.send_task(
            ANALYZE_TASK, args=[request.to_message()], queue=INFERENCE_QUEUE, priority=task_priority(inst.priority)
        )
        with self._lock:
            self._published[job_id] = time.monotonic()
            self._sends[job_id] = self._sends.get(job_id, 0) + 1
        store.add_event(
            "analysis.published",
            instance_id=instance_id,
            detail={
                "job_id": job_id,
                "reply_queue": request.reply_queue,
                "publish_ms": round((time.monotonic() - started) * 1000, 1),
                "pixels": list(prepared.pixels.shape),
                "notes": list(prepared.notes),
            },
        )
        return True


class Sweeper:
    """Every `interval_s`, hands off again every queued instance whose job was not published (outbox)."""

    def __init__(
        self,
        store: AuditStore,
        dispatcher: Dispatcher,
        publisher: Publisher,
        *,
        interval_s: float = 5.0,
        grace_s: float = 10.0,
    ) -> None:
        self.store, self.dispatcher, self.publisher = store, dispatcher, publisher
        self.interval_s = interval_s
        self.grace_s = grace_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-sweeper", daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def sweep_once(self) -> int:
        """Submit queued instances nobody published: left behind by a broker outage or a lost message.

        Only this node's instances (another node's images are not here). Another process of this node
        may own a fresh instance (a listener publishes what it received), so only
        instances queued more than `grace_s` ago are considered, and a job whose publish another
        process recorded in the audit log is not published again.
        """
        now = utcnow()
        own = InstanceFilter(states=[InstanceState.QUEUED], node=self.store.node, limit=500)
        stale = [
            i
            for i in self.store.list_instances(own)
            if i.queued_at is None or as_utc(i.queued_at) < now - timedelta(seconds=self.grace_s)
        ]
        if not stale:
            return 0
        since = now - timedelta(seconds=self.publisher.republish_after_s)
        elsewhere = {
            str(e.detail.get("job_id")) for e in self.store.list_events(since=since, kinds=["analysis.published"])
        }
        n = 0
        for inst in stale:
            job_id = inst.job_id
            if job_id in elsewhere:
                self.publisher.remember(job_id)
            elif self.publisher.due(job_id):
                self.dispatcher.submit(inst.id)
                n += 1
        return n

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep_once()
            except Exception:
                log.exception("outbox sweep failed; retrying in %.0f s", self.interval_s)
