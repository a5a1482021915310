"""What every benchmark needs: loopback ports, bounded waits, the machine's conditions, process RSS, JSON."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO / ".." / "shared" / "data"
DICOM_DIR = SHARED_DATA / "dicom"
RESERVED_PORTS = {104, 4242, 5432, 6379, 8042, 8080, 11112}
LOOPBACK = "127.0.0.1"


def without_venv_scripts(path: str) -> str:
    """`path` (a PATH value) without this interpreter's scripts folder.

    pynetdicom installs apps named like DCMTK's (storescp, storescu, echoscu, findscu) into the venv's
    bin; with the venv activated they shadow the DCMTK tools that the benchmarks measure against and
    the tests talk to. `make test` and `make bench` never put that folder on PATH; this makes an
    activated shell behave the same.
    """
    scripts = (Path(sys.prefix) / "bin").resolve()
    return os.pathsep.join(p for p in path.split(os.pathsep) if p and Path(p).resolve() != scripts)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (never a well-known service port)."""
    while True:
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            port = int(s.getsockname()[1])
        if port not in RESERVED_PORTS:
            return port


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def cxrnode_command() -> list[str]:
    script = Path(sys.executable).parent / "cxrnode"
    return [str(script)] if script.exists() else [sys.executable, "-m", "node.cli.main"]


def training_running() -> list[str]:
    """Command lines of background training/evaluation jobs (they share the 2 cores with the benchmark)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if "-m training" in cmd or "training/" in cmd.split(" ")[0]:
            found.append(cmd[:160])
    return found


def cpu_busy_processes(sample_s: float = 1.0, min_share: float = 0.2) -> list[dict[str, Any]]:
    """Processes using at least `min_share` of one core over a short sample (what competes for the CPU)."""

    def ticks() -> dict[int, tuple[int, str]]:
        out = {}
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except (OSError, IndexError):
                continue
            out[int(proc.name)] = (int(fields[11]) + int(fields[12]), cmd[:120])
        return out

    hz = os.sysconf("SC_CLK_TCK")
    before = ticks()
    time.sleep(sample_s)
    after = ticks()
    busy = []
    for pid, (t, cmd) in after.items():
        if pid in before:
            share = (t - before[pid][0]) / hz / sample_s
            if share >= min_share:
                busy.append({"pid": pid, "cpu_cores": round(share, 2), "cmd": cmd})
    return sorted(busy, key=lambda p: -p["cpu_cores"])


def conditions() -> dict[str, Any]:
    """The machine and what else runs on it, recorded with every result."""
    load1, load5, load15 = os.getloadavg()
    return {
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "training_running": bool(training_running()),
        "training_jobs": training_running(),
        "cpu_busy_processes": cpu_busy_processes(),
    }


def tree_pids(root: int) -> list[int]:
    """root and all its descendants (from /proc/*/stat parent links)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages (forked listeners) counted once across the processes."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples the summed RSS (and PSS) of a process tree on a thread; `peak` is the highest RSS sum seen."""

    def __init__(self, root_pid: int, interval_s: float = 0.1) -> None:
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.peak = 0
        self.peak_pss = 0
        self.peak_processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = tree_pids(self.root_pid)
            total = sum(rss_bytes(p) for p in pids)
            if total > self.peak:
                self.peak, self.peak_processes = total, len(pids)
            self.peak_pss = max(self.peak_pss, sum(pss_bytes(p) for p in pids))
            self.samples += 1
            self._stop.wait(self.interval_s)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), None for no values."""
    data = list(values)
    return float(np.percentile(np.asarray(data, dtype=float), q)) if data else None


def run_checked(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}")
    return proc


def write_json(out_dir: Path, name: str, data: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return path


def mb(n_bytes: float) -> float:
    return n_bytes / 1e6
