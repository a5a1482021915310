"""PDU length is checked before a PDU is read (issue 13, finding 3), against a running node.

An 839 MB PDU declared before any association was buffered by the node as it arrived. Now a PDU longer
than ``dicom.max_request_pdu`` before association, or than the negotiated ``dicom.max_pdu`` after,
gets an A-ABORT, the connection is dropped without reading the body, and ``connection.dropped`` says
who it was. Raw sockets send the malformed PDUs; a real storescu still stores afterwards.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.support.dcmtk import storescu
from tests.support.net import wait_for
from tests.support.node import NodeProcess
from tests.support.synthetic_dicom import small_chest_copies

pytestmark = pytest.mark.timeout(180)

A_ABORT = 0x07


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def push_until_dropped(sock: socket.socket, total: int, chunk: int = 1 << 20, limit_s: float = 10) -> int:
    """Send up to `total` junk bytes; returns how many went before the node dropped the connection."""
    sent, deadline = 0, time.monotonic() + limit_s
    sock.settimeout(2)
    try:
        while sent < total and time.monotonic() < deadline:
            sent += sock.send(b"\0" * chunk)
    except OSError:
        pass
    return sent


def read_reply(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except OSError:
        pass
    return data


def test_oversized_pdus_are_refused_unread_and_audited(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path).start()
    assert node.proc is not None
    store = node.store()
    before = rss_mb(node.proc.pid)

    # 1. Before any association: an A-ASSOCIATE-RQ header declaring 839 MB, then 64 MB of its "body".
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 839_000_000))
        sent = push_until_dropped(sock, 64 << 20)
        assert sent < 64 << 20, "the node kept reading the body of an 839 MB PDU"
    wait_for(lambda: bool(store.list_events(kinds=["connection.dropped"])), 10, "the drop to be audited")
    (event,) = store.list_events(kinds=["connection.dropped"])
    assert event.detail["peer"].startswith("127.0.0.1:") and event.detail["pdu_length"] == 839_000_000
    assert event.detail["limit"] == 65536 and not event.detail["associated"]
    assert rss_mb(node.proc.pid) - before < 50

    # 2. After association: a P-DATA-TF longer than the maximum the node negotiated (262144).
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CXRNODE")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    assert raw is not None
    raw.sendall(struct.pack(">BBL", 0x04, 0, 262145) + b"\0" * 4096)
    wait_for(lambda: assoc.is_aborted or not assoc.is_alive(), 10, "the node to abort the association")
    assoc.kill()
    wait_for(lambda: len(store.list_events(kinds=["connection.dropped"])) == 2, 10, "the second drop")
    second = store.list_events(kinds=["connection.dropped"])[1]
    assert second.detail["calling_ae"] == "STORESCU" and second.detail["associated"]
    assert second.detail["pdu_length"] == 262145 and second.detail["limit"] == 262144
    wait_for(lambda: any(a.result == "aborted" for a in store.list_associations()), 10, "the abort audited")

    # 3. A raw client sees an A-ABORT before the close.
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 10_000_000))
        assert read_reply(sock)[:1] == bytes([A_ABORT])

    # The node still stores from a real modality, with PDUs at the negotiated maximum.
    result = storescu(node.port, small_chest_copies(tmp_path / "ok", 2))
    assert result.statuses == [0x0000, 0x0000], result.output
    assert node.stop() == 0
    node.close()
