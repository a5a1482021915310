"""Receive-side limits against a running node (issue 13, finding 5): one data set cannot fill the disk.

A data set larger than ``storage.max_instance_mb`` gets 0xA700 with the reason as Error Comment, its
bytes are not kept beyond the cap while it arrives, and a rejected row says why; the same association
goes on storing the next (small) data set.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import pytest

from node.audit import InstanceState
from tests.support.dcmtk import storescu
from tests.support.node import NodeProcess
from tests.support.paths import dicom_dir
from tests.support.synthetic_dicom import small_chest_copies

pytestmark = pytest.mark.timeout(180)

BIG = dicom_dir() / "01_cr_explicit_le_mono2_12bit_2048x2500.dcm"  # ~10 MB


def test_oversized_data_set_is_refused_while_it_arrives_and_not_kept(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, storage_toml="max_instance_mb = 1").start()
    cap = 1024 * 1024
    largest = [0]
    done = threading.Event()

    def watch_incoming() -> None:  # the biggest partial file seen while the data set arrives
        incoming = node.spool / ".incoming"
        while not done.is_set():
            for p in incoming.glob("*"):
                with contextlib.suppress(FileNotFoundError):
                    largest[0] = max(largest[0], p.stat().st_size)

    watcher = threading.Thread(target=watch_incoming, daemon=True)
    watcher.start()
    try:
        small = small_chest_copies(tmp_path / "small", 1)
        result = storescu(node.port, [BIG, *small])
    finally:
        done.set()
        watcher.join(5)
    assert result.returncode == 0, result.output
    statuses = list(result.responses.values())
    assert statuses == [0xA700, 0x0000], result.output
    assert "ErrorComment" in result.output and "exceeds storage.max_instance_mb 1" in result.output
    # Never more than the cap plus one PDU (dicom.max_pdu) on disk for it.
    assert largest[0] <= cap + 262144 + 4096, largest[0]
    store = node.store()
    rejected = [i for i in store.list_instances() if i.state == InstanceState.REJECTED]
    assert len(rejected) == 1 and rejected[0].size_bytes > 10 * cap // 2
    assert "exceeds storage.max_instance_mb 1" in rejected[0].reason and not rejected[0].quarantine_path
    (event,) = store.list_events(kinds=["instance.rejected"])
    assert event.detail["status"] == "0xA700"
    assert len(list(node.spool.glob("*/*.dcm"))) == 1  # the small one only
    assert not list((node.spool / ".incoming").iterdir()) and not list(node.quarantine.iterdir())
    assert node.stop() == 0
    node.close()
