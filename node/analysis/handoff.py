"""The hand-off from ingest to analysis: one function, called for every instance in state ``queued``.

The function is the analysis outbox's Publisher (node.analysis.outbox) when a broker is enabled, and
:func:`leave_queued` when `broker.enabled = false` (ingest only). It must be idempotent: it runs again for every ``queued`` instance when the node restarts,
so the analysis side must tolerate the same instance twice (Celery: acks_late, task keyed by instance).
It runs on the dispatcher thread, after the C-STORE response went out, so a slow broker never
delays the peer.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from node.audit import AuditStore
from node.runtime.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HandoffContext:
    """What a hand-off needs: the settings (broker) and the audit store."""

    settings: Settings
    store: AuditStore


def leave_queued(ctx: HandoffContext, instance_id: int) -> None:
    """`broker.enabled = false`: the instance stays `queued` until a node with a broker resumes it."""
    log.info("instance %d stays queued (broker.enabled = false)", instance_id)


HandoffFn = Callable[[HandoffContext, int], None]


class Dispatcher:
    """Runs hand-offs on one background thread, in arrival order; failures leave the instance queued."""

    def __init__(self, ctx: HandoffContext, fn: HandoffFn) -> None:
        self.ctx = ctx
        self._fn = fn
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="handoff", daemon=True)

    def start(self) -> Dispatcher:
        self._thread.start()
        return self

    def submit(self, instance_id: int) -> None:
        self._queue.put(instance_id)

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish what was submitted, then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (instance_id := self._queue.get()) is not None:
            try:
                self._fn(self.ctx, instance_id)
            except Exception:
                # The instance stays `queued`; the next start hands it off again.
                log.exception("hand-off of instance %d failed; it stays queued", instance_id)
