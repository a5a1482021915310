"""`cxrnode serve` with `dicom.listeners = 2`: several receiving processes on one port, one node."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.audit import InstanceFilter
from node.runtime.config import Settings, load_settings
from node.runtime.listeners import ListenerPool
from tests.support.dcmtk import echoscu, storescu
from tests.support.net import free_port, wait_for
from tests.support.node import NodeProcess
from tests.support.paths import dicom_dir
from tests.support.synthetic_dicom import small_chest_copies

PADDED = dicom_dir() / "11_cr_pixel_padding_value0.dcm"  # image in rows 112..943, cols 88..967


def _listener_pids(node: NodeProcess) -> list[int]:
    assert node.proc is not None
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == node.proc.pid:
                    pids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return pids


def _metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _received(port: int) -> tuple[float, float, float]:
    """C-STORE successes, accepted associations and received bytes on the node's /metrics."""
    m = _metrics(port)
    return (
        m.get(("cxrnode_cstore_responses_total", (("status", "0x0000"),)), 0.0),
        m.get(("cxrnode_associations_total", (("reason", "none"), ("result", "accepted"))), 0.0),
        m.get(("cxrnode_received_bytes_total", ()), 0.0),
    )


def test_two_listeners_share_the_port_and_a_dead_one_is_replaced(tmp_path: Path) -> None:
    files = small_chest_copies(tmp_path / "send", 40)
    web_port = free_port()
    node = NodeProcess(tmp_path, extra_toml=f"listeners = 2\n[web]\nenabled = true\nport = {web_port}\n")
    try:
        node.start()
        assert echoscu(node.port).returncode == 0
        # Four concurrent associations, ten files each: the kernel spreads them over the listeners.
        results: list[int] = []
        threads = [
            threading.Thread(target=lambda chunk=files[i::4]: results.extend(storescu(node.port, chunk).statuses))
            for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [0] * 40
        store = node.store()
        rows = store.list_instances(InstanceFilter())
        assert len(rows) == 40 and {r.state for r in rows} == {"queued"}  # broker off: stays queued
        assert len({r.sop_instance_uid for r in rows}) == 40
        assert len(list(node.spool.rglob("*.dcm"))) == 40
        assert len({r.association_id for r in rows}) == 4

        # /metrics (served by the parent) sums what both listener processes counted (issue 17, finding 9).
        size = sum(f.stat().st_size for f in files)
        wait_for(lambda: _received(web_port)[:2] == (40, 5), 20, "the listeners' counts on /metrics")
        assert _received(web_port)[2] >= size * 0.9  # datasets, a little less than the files' size

        listeners = _listener_pids(node)
        assert len(listeners) == 2, listeners
        os.kill(listeners[0], signal.SIGKILL)
        wait_for(lambda: len(set(_listener_pids(node)) - {listeners[0]}) == 2, 30, "a replacement listener")
        more = small_chest_copies(tmp_path / "more", 6)
        assert storescu(node.port, more).statuses == [0] * 6
        assert len(store.list_instances(InstanceFilter())) == 46
        # The killed listener's counts stay in the sum: counters never go down while the node runs.
        wait_for(lambda: _received(web_port)[:2] == (46, 6), 20, "the replacement's counts on /metrics")
        assert node.stop() == 0  # SIGTERM: every listener finishes and the node exits cleanly
    finally:
        node.close()
        shutil.rmtree(tmp_path / "send", ignore_errors=True)


def test_listeners_publish_with_the_geometry_and_the_parent_runs_the_services(tmp_path: Path) -> None:
    """With the broker on, a listener publishes what it received (geometry kept first); the parent runs
    the node's services (pipeline, node.started) as a single-process node does. No inference worker."""
    node = NodeProcess(tmp_path, extra_toml="listeners = 2\n[broker]\nembedded_worker = false\n")
    try:
        node.start()
        assert storescu(node.port, [PADDED]).statuses == [0]
        store = node.store()
        wait_for(lambda: store.list_events(kinds=["analysis.published"]), 60, "the listener's publish")
        (inst,) = store.list_instances(InstanceFilter())
        assert inst.state == "queued" and inst.prepared_geometry is not None
        assert (inst.prepared_geometry["job_id"], inst.prepared_geometry["crop"]) == (inst.job_id, [112, 88, 944, 968])
        (started,) = store.list_events(kinds=["node.started"])
        assert started.detail["listeners"] == 2 and started.detail["port"] == node.port
        assert node.stop() == 0
    finally:
        node.close()


def _slow_listener(settings: Settings, index: int, stop: threading.Event, ready: Callable[[], None]) -> None:
    time.sleep(1.0 + index)  # opening the database and the broker takes a while on a busy host
    ready()
    stop.wait()


def _broken_listener(settings: Settings, index: int, stop: threading.Event, ready: Callable[[], None]) -> None:
    raise SystemExit(3)  # e.g. a listener that cannot open the audit database


def test_the_parent_waits_until_every_listener_accepts() -> None:
    """ "running on" is announced only after wait_ready: a peer that trusts it meets no refused connection."""
    pool = ListenerPool(load_settings(None), 2, _slow_listener).start()
    try:
        started = time.monotonic()
        pool.wait_ready(30)
        assert time.monotonic() - started >= 1.9  # the slower listener said it accepts
    finally:
        pool.stop(1)


def test_a_listener_that_dies_before_accepting_stops_the_start() -> None:
    pool = ListenerPool(load_settings(None), 2, _broken_listener).start()
    try:
        with pytest.raises(RuntimeError, match=r"listener 0 exited with status 3 before it accepted"):
            pool.wait_ready(30)
    finally:
        pool.stop(1)
