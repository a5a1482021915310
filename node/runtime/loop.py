"""One background loop for the node's periodic services (exporter, alerter, triage).

Each of them is a ``run_once`` pass repeated every ``interval_s`` on its own daemon thread, woken
early by ``wake`` (e.g. when new work was queued), stopped by ``stop``; a pass that raises is logged
and the loop goes on, because a service of a node that must never lose work cannot die on one bad
row. Long passes check :attr:`stopping` between items so that a SIGTERM does not wait for a whole pass.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class BackgroundLoop:
    """Subclasses implement :meth:`run_once`; ``start`` returns self for chaining."""

    def __init__(self, name: str, interval_s: float = 1.0) -> None:
        self.name = name
        self.interval_s = interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def run_once(self) -> int:
        raise NotImplementedError

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def start(self) -> BackgroundLoop:
        self._thread.start()
        return self

    def stop(self, join_s: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(join_s)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("%s pass failed; retrying", self.name)
            self._wake.wait(self.interval_s)
            self._wake.clear()
