"""`python -m training ...` child processes, a few at a time: how `crossval` and `campaign` run theirs.

Each training is its own process (its own log, its own memory, one crash stops only itself); on a
GPU several share the card, on a CPU run them one at a time.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def run_processes(commands: Sequence[tuple[str, list[str], Path]], parallel: int = 1) -> dict[str, int]:
    """Run (label, argv, log file) commands, `parallel` at a time, output appended to each log file;
    returns their exit codes by label."""
    pending = list(commands)
    running: list[tuple[str, subprocess.Popen[bytes]]] = []
    codes: dict[str, int] = {}
    while pending or running:
        while pending and len(running) < max(1, parallel):
            label, argv, log_file = pending.pop(0)
            log.info("%s: %s", label, " ".join(argv))
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(log_file, "ab") as f:
                running.append((label, subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)))
        time.sleep(1)
        for item in list(running):
            label, proc = item
            if proc.poll() is not None:
                running.remove(item)
                codes[label] = proc.returncode
                log.info("%s: exit %d", label, proc.returncode)
    return codes
