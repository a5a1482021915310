"""Child processes that `cxrnode serve` keeps alive: the node-queue worker and, in embedded mode, a CPU
inference worker. A child that exits is restarted with backoff; stop sends SIGTERM (Celery's warm
shutdown lets the running task finish) and SIGKILL after a grace period.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    log_file: Path | None = None


def die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the node dies, even by SIGKILL (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Supervisor:
    def __init__(self, children: list[ChildSpec], *, grace_s: float = 30.0, max_backoff_s: float = 60.0) -> None:
        self.children = children
        self.grace_s = grace_s
        self.max_backoff_s = max_backoff_s
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._restarts: dict[str, int] = {c.name: 0 for c in children}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def start(self) -> Supervisor:
        for child in self.children:
            self._spawn(child)
        self._thread.start()
        return self

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self._procs.items() if p.poll() is None}

    def restarts(self) -> dict[str, int]:
        return dict(self._restarts)

    def _spawn(self, child: ChildSpec) -> None:
        out = None
        if child.log_file is not None:
            child.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = open(child.log_file, "ab")  # noqa: SIM115 - handed to the child, closed when it is replaced
        env = {**os.environ, **child.env}
        proc = subprocess.Popen(
            child.argv,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        if out is not None:
            out.close()
        self._procs[child.name] = proc
        log.info("started %s (pid %d): %s", child.name, proc.pid, " ".join(child.argv))

    def _watch(self) -> None:
        next_start: dict[str, float] = {}
        while not self._stop.wait(1.0):
            for child in self.children:
                proc = self._procs.get(child.name)
                if proc is None or proc.poll() is None:
                    continue
                now = time.monotonic()
                if child.name not in next_start:
                    n = self._restarts[child.name]
                    delay = min(self.max_backoff_s, 2.0 ** min(n, 6))
                    log.warning("%s exited with status %s; restarting in %.0f s", child.name, proc.returncode, delay)
                    next_start[child.name] = now + delay
                elif now >= next_start[child.name]:
                    del next_start[child.name]
                    self._restarts[child.name] += 1
                    self._spawn(child)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for proc in self._procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for name, proc in self._procs.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", name, self.grace_s)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
