"""Fuzz campaign against a running node (issue 13, "measured, not only tested").

1000 mutated and truncated data sets (from the shared test files, small generated CRs, the poison values
and a JPEG 2000 bomb) are sent with pynetdicom, then 200 malformed PDUs open raw connections. Measured:
0 crashes (the node process lives), 0 hangs (every C-STORE answered or its association closed within the
DIMSE timeout; every raw connection closed within the request deadline), one audit row per answered
C-STORE, the node's peak RSS under 500 MB, and a valid image sent afterwards stored and published for
analysis. CXRNODE_FUZZ_N changes the number of data sets; the figures are printed (``-s``) for the README.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, _config

from node.audit import InstanceState
from tests.support.dcmtk import storescu
from tests.support.fuzz import malformed_pdus, mutated_files
from tests.support.net import wait_for
from tests.support.node import NodeProcess
from tests.support.synthetic_dicom import small_chest_copies

pytestmark = pytest.mark.timeout(900)

N_DATASETS = int(os.environ.get("CXRNODE_FUZZ_N", "1000"))
N_PDUS = 200
RSS_BOUND_MB = 500
DEADLINE_S = 2
NODE_TOML = f"association_request_timeout_s = {DEADLINE_S}\nnetwork_timeout = 5\n[broker]\nembedded_worker = false\n"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Sender:
    """One pynetdicom association proposing every (SOP class, transfer syntax) of the files; reopened
    when the node ends it. Files are streamed as they are (chunked): garbage goes out as garbage."""

    def __init__(self, port: int, files: list[Path]) -> None:
        self.port = port
        self.ae = AE(ae_title="STORESCU")
        self.ae.dimse_timeout = self.ae.network_timeout = 30
        pairs = set()
        for f in files:
            meta = pydicom.filereader.read_file_meta_info(f)
            pairs.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        for sop_class, ts in sorted(pairs):
            self.ae.add_requested_context(sop_class, [ts])
        self.assoc = None
        self.reopened = 0

    def send(self, path: Path) -> int | None:
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title="CXRNODE")
            self.reopened += 1
            if not self.assoc.is_established:
                raise AssertionError("the node refused a fresh association")
        rsp = self.assoc.send_c_store(path)
        return int(rsp.Status) if rsp is not None and "Status" in rsp else None

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


def raw_case(port: int, data: bytes) -> tuple[bool, float]:
    """(closed by the node in time, seconds): send `data` on a fresh connection, read until it closes."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(data)
        except OSError:
            return True, time.monotonic() - started
        sock.settimeout(0.5)
        while time.monotonic() - started < DEADLINE_S + 6:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return True, time.monotonic() - started
            if not chunk:
                return True, time.monotonic() - started
            if chunk[:1] == b"\x02":  # a flipped bit left a valid request: accepted; we just leave
                return True, time.monotonic() - started
    return False, time.monotonic() - started


def test_fuzz_campaign(tmp_path: Path) -> None:
    files = list(mutated_files(tmp_path / "fuzz", N_DATASETS))
    (tmp_path / "node").mkdir()
    node = NodeProcess(tmp_path / "node", extra_toml=NODE_TOML).start()
    assert node.proc is not None
    pid = node.proc.pid
    peak = [rss_mb(pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            try:
                peak.append(rss_mb(pid))
            except (OSError, AssertionError):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    statuses: dict[str, int] = {}
    unanswered = 0
    slowest = 0.0
    started = time.monotonic()
    try:
        sender = Sender(node.port, files)
        for path in files:
            t0 = time.monotonic()
            try:
                status = sender.send(path)
            except (RuntimeError, ValueError, OSError, AttributeError):
                status = None
            slowest = max(slowest, time.monotonic() - t0)
            if status is None:
                unanswered += 1
            else:
                key = f"0x{status:04X}"
                statuses[key] = statuses.get(key, 0) + 1
        sender.close()
        datasets_s = time.monotonic() - started

        t1 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(lambda d: raw_case(node.port, d), malformed_pdus(N_PDUS)))
        pdus_s = time.monotonic() - t1
        assert node.proc.poll() is None, "the node died"

        valid = small_chest_copies(tmp_path / "valid", 1)
        result = storescu(node.port, valid)
        assert result.statuses == [0x0000], result.output[-2000:]
        store = node.store()
        uid = str(pydicom.dcmread(valid[0], stop_before_pixels=True).SOPInstanceUID)

        def published() -> bool:
            rows = [r for r in store.list_instances() if r.sop_instance_uid == uid]
            return bool(rows) and any(
                e.instance_id == rows[0].id for e in store.list_events(kinds=["analysis.published"])
            )

        wait_for(published, 120, "the valid image to be published for analysis")
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        stop.set()
        sampler.join(5)
        code = node.stop(timeout=60)
    assert code == 0, node.log_text()[-3000:]

    answered = sum(statuses.values())
    rows = [r for r in store.list_instances() if r.sop_instance_uid != uid]
    errors = store.list_events(kinds=["instance.error"])
    hangs = [s for ok, s in outcomes if not ok]
    figures = {
        "datasets": N_DATASETS,
        "answered": answered,
        "unanswered_association_closed": unanswered,
        "statuses": statuses,
        "datasets_s": round(datasets_s, 1),
        "slowest_store_s": round(slowest, 2),
        "associations_opened": sender.reopened,
        "instance_rows": len(rows),
        "instance_errors": len(errors),
        "states": {s: sum(r.state == s for r in rows) for s in sorted({r.state for r in rows})},
        "pdus": N_PDUS,
        "pdu_hangs": len(hangs),
        "pdus_s": round(pdus_s, 1),
        "slowest_pdu_close_s": round(max(s for _, s in outcomes), 2),
        "connection_dropped_rows": len(store.list_events(kinds=["connection.dropped"])),
        "rss_start_mb": round(peak[0]),
        "rss_peak_mb": round(max(peak)),
    }
    print("FUZZ " + json.dumps(figures, sort_keys=True))
    (tmp_path / "fuzz.json").write_text(json.dumps(figures, indent=2))
    assert not hangs and slowest < 30
    assert len(rows) + len(errors) == answered  # one audit row per answered C-STORE
    assert not [r for r in rows if r.state == InstanceState.QUEUED and not r.spool_path]
    assert max(peak) < RSS_BOUND_MB, figures
    node.close()
