"""Half-open connections cannot hold the node's association slots (issue 13, finding 2).

Slow sockets on 127.0.0.1 send the start of an A-ASSOCIATE-RQ and then one byte a second (or nothing).
Before the guard each held an association slot for as long as it dripped; now the oldest waiting
connections are dropped when a peer or the node has too many, each is dropped at the request deadline,
and a real echoscu and storescu from the same address succeed meanwhile. Bounded: 6 sockets, ~10 s.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from tests.support.dcmtk import echoscu, storescu
from tests.support.net import wait_for
from tests.support.node import NodeProcess
from tests.support.synthetic_dicom import small_chest_copies

pytestmark = pytest.mark.timeout(180)

DEADLINE_S = 3
LIMITS = (
    f"association_request_timeout_s = {DEADLINE_S}\nmax_pending_associations = 4\n"
    "max_connections_per_peer = 6\nmax_associations = 6\n"
)


def slow_socket(port: int, drip: bool) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if drip:  # the first bytes of an A-ASSOCIATE-RQ declaring 200 bytes: protocol version, reserved
        sock.sendall(struct.pack(">BBLHH", 0x01, 0, 200, 1, 0))
    return sock


def closed_by_node(sock: socket.socket) -> bool:
    """True once the node has closed the connection (EOF or reset, after an optional A-ABORT)."""
    sock.settimeout(0.05)
    try:
        while data := sock.recv(4096):
            if data[:1] != b"\x07":
                return False
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_slow_connections_are_dropped_and_real_peers_still_get_through(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, extra_toml=LIMITS).start()
    store = node.store()
    sockets = [slow_socket(node.port, drip=i != 0) for i in range(6)]  # the first one never says a word
    opened = time.monotonic()
    stop = threading.Event()

    def drip() -> None:
        while not stop.wait(1.0):
            for s in sockets[1:]:
                with contextlib.suppress(OSError):
                    s.send(b"A")

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        # Meanwhile a real modality on the same address: echo and store.
        assert echoscu(node.port).returncode == 0
        result = storescu(node.port, small_chest_copies(tmp_path / "ok", 2))
        assert result.statuses == [0x0000, 0x0000], result.output
        assert time.monotonic() - opened < DEADLINE_S  # it got through while the slow sockets were there
        # Every slow socket is gone by the deadline (the two oldest at once: 4 may wait, 6 came).
        wait_for(lambda: all(closed_by_node(s) for s in sockets), DEADLINE_S + 5, "the slow sockets to be dropped")
        assert time.monotonic() - opened < DEADLINE_S + 5
    finally:
        stop.set()
        dripper.join(5)
        for s in sockets:
            s.close()

    # The node cuts a connection first and audits it after (a busy audit log must not keep a peer
    # waiting), so on a loaded machine the rows may come a moment after the sockets close.
    wait_for(
        lambda: len(store.list_events(kinds=["connection.dropped"])) >= len(sockets),
        10,
        "a connection.dropped row for each slow socket",
    )
    drops = store.list_events(kinds=["connection.dropped"])
    reasons = [e.detail["reason"] for e in drops]
    assert all(e.detail["peer"].startswith("127.0.0.1:") for e in drops)
    assert any("max_pending_associations 4" in r for r in reasons), reasons
    assert any("association request not complete" in r for r in reasons), reasons
    assert len(drops) <= 10  # 6 sockets, plus the real peers' evictions: one row each
    accepted = [a for a in store.list_associations() if a.result != "rejected"]
    assert len(accepted) == 2 and not [a for a in store.list_associations() if a.result == "rejected"]

    # Afterwards a new association gets through at once, and the node stops without waiting for anyone.
    assert echoscu(node.port).returncode == 0
    started = time.monotonic()
    assert node.stop() == 0
    assert time.monotonic() - started < 10
    node.close()
