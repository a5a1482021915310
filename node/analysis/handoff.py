"""The hand-off from ingest to analysis: one function, called for every instance in state ``queued``.

``hand_off`` must be idempotent: it runs again for every ``queued`` instance when the node restarts,
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


def hand_off(ctx: HandoffContext, instance_id: int) -> None:
    """Send one queued instance to analysis.

    The pluggable hook: the Celery wiring (node.analysis.tasks) replaces this body with sending the task.
    Until then it only records that the instance is waiting for analysis.
    """
    log.info("instance %d queued for analysis (no analysis queue wired yet)", instance_id)


HandoffFn = Callable[[HandoffContext, int], None]


class Dispatcher:
    """Runs hand-offs on one background thread, in arrival order; failures leave the instance queued."""

    def __init__(self, ctx: HandoffContext, fn: HandoffFn | None = None) -> None:
        self.ctx = ctx
        self._fn = fn
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="handoff", daemon=True)

    def set_handoff(self, fn: HandoffFn) -> None:
        """Install the real hand-off (the analysis pipeline's publisher) before `start`."""
        self._fn = fn

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
        fn = self._fn or hand_off
        while (instance_id := self._queue.get()) is not None:
            try:
                fn(self.ctx, instance_id)
            except Exception:
                # The instance stays `queued`; the next start hands it off again.
                log.exception("hand-off of instance %d failed; it stays queued", instance_id)
