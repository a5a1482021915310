"""Where a receiving node process spends its time, sampled with py-spy (optional: skipped when absent).

`py-spy record --idle -f raw` gives wall-clock stacks per thread. For the association threads (the
ones that run the C-STORE handler) the samples are split into: receiving (pynetdicom reading and
decoding PDUs, writing the data set to the spool's temp file, or waiting for the next PDU) and the
node's ingest steps (header read, duplicate check, durable spool commit, the audit commits).
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: (category, substring of a frame) in priority order: the first that matches a stack names it.
INGEST_STEPS = (
    ("spool: fsync + rename (durable file)", "Spool.commit"),
    ("audit: record received (SQLite commit)", "record_instance_received"),
    ("audit: set state queued (second commit)", "set_instance_state"),
    ("audit: duplicate check (SELECT)", "find_live_instance"),
    ("header read (pydicom, pixels deferred)", "read_header"),
    ("disk watermark check", "has_room"),
    ("hand-off", "hand_off"),
)
ASSOCIATION_THREAD = "Association._run_reactor"


def py_spy() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


def sample(pid: int, out: Path, work: Callable[[], Any], rate: int = 200, idle: bool = True) -> Any:
    """Run `work()` while py-spy samples `pid` (and its children); returns what work returned.

    idle=True samples every thread (wall time); False only threads on the CPU (CPU time).
    """
    exe = py_spy()
    if exe is None:
        raise FileNotFoundError("py-spy is not installed")
    spy = subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            *(["--idle"] if idle else []),
            "-f",
            "raw",
            "-r",
            str(rate),
            "-d",
            "300",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)  # py-spy attaches
        result = work()
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(5)
    return result


def _category(stack: str) -> str:
    if "Ingest.receive" in stack:
        for name, needle in INGEST_STEPS:
            if needle in stack:
                return "ingest: " + name
        return "ingest: other"
    if "write" in stack and "tempfile" in stack:
        return "receive: data set to temp file"
    if "decode" in stack or "_serve_request" in stack:
        return "receive: DIMSE/PDU decode"
    return "receive: waiting for PDUs (pynetdicom reactor poll/sleep)"


def summarise(raw: Path) -> dict[str, Any]:
    """Shares of the association threads' wall time, and the busiest frames of the whole process."""
    per_category: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    assoc_total = total = 0
    for line in raw.read_text(errors="replace").splitlines():
        if " " not in line:
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        leaf = re.sub(r" \((?:.*/)?([^/]+?):\d+\)", r" (\1)", stack.split(";")[-1])
        self_time[leaf] += n
        if ASSOCIATION_THREAD in stack:
            assoc_total += n
            per_category[_category(stack)] += n
    if not assoc_total:
        return {"samples": total, "association_thread_samples": 0}
    return {
        "samples": total,
        "association_thread_samples": assoc_total,
        "association_thread_share": {k: round(v / assoc_total, 3) for k, v in per_category.most_common()},
        "ingest_share": round(sum(v for k, v in per_category.items() if k.startswith("ingest")) / assoc_total, 3),
        "top_frames_all_threads": {k: round(v / total, 3) for k, v in self_time.most_common(8)},
    }


#: Processes of the embedded node, recognised by their command line.
PIPELINE_PROCESSES = (
    ("workers.tasks", "inference worker"),
    ("node.analysis.tasks", "node worker (node.finish: SEG/SR)"),
    ("serve", "cxrnode serve (SCP, publisher, sweeper, exporter)"),
)
#: Frames from these modules name a sample (the deepest one wins); others fall back to the leaf frame.
OWN_MODULES = re.compile(
    r"\((prepare|finish|seg|sr|exporter|sender|analysis|inference|runner|severity|api|"
    r"store|ingest|spool)\.py\)"
)


def summarise_processes(raw: Path, top: int = 6) -> dict[str, Any]:
    """CPU share per process of the embedded node, and each process's busiest functions."""
    per_proc: Counter[str] = Counter()
    frames: dict[str, Counter[str]] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        parts = stack.split(";")
        procs = [f for f in parts if f.startswith("process ")]
        cmd = procs[-1] if procs else "?"
        name = next((label for needle, label in PIPELINE_PROCESSES if needle in cmd), cmd[:80])
        names = [re.sub(r" \((?:.*/)?([^/]+?):\d+\)", r" (\1)", f) for f in parts if not f.startswith("process ")]
        key = next((f for f in reversed(names) if OWN_MODULES.search(f)), names[-1] if names else "?")
        per_proc[name] += n
        frames.setdefault(name, Counter())[key] += n
    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "cpu_share": {
            name: {
                "share": round(n / total, 3),
                "top": {k: round(v / total, 3) for k, v in frames[name].most_common(top)},
            }
            for name, n in per_proc.most_common()
        },
    }
