"""A busy audit database does not keep a peer waiting for its answer (CI failure of 2026-12-03).

SQLite has one writer at a time and the node waits up to its busy timeout (30 s) for the lock; in the
fuzz campaign the ingest backlog held it while raw connections waited, and one bad connection stayed
open 8 s. The answers that need nothing kept (a dropped connection, a rejected or an accepted
association request) must not wait for the write lock: each is given first, its audit row follows
once the database is free. Here another process holds the write lock for HOLD_S seconds while raw
connections ask; each must be answered within the request deadline plus a margin, far below HOLD_S.
"""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tests.support.fuzz import _associate_rq
from tests.support.net import wait_for
from tests.support.node import NodeProcess

pytestmark = pytest.mark.timeout(180)

DEADLINE_S = 2  # dicom.association_request_timeout_s
HOLD_S = 15.0
ANSWER_WITHIN_S = DEADLINE_S + 4  # far below HOLD_S: nobody waited for the lock
A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT = 0x02, 0x03, 0x07


def ask(port: int, data: bytes) -> tuple[list[int], float]:
    """Send `data` on a fresh connection; (the PDU types the node answered with, seconds until it
    closed the connection or, for an A-ASSOCIATE-AC, until that arrived)."""
    started = time.monotonic()
    types: list[int] = []
    with socket.create_connection(("127.0.0.1", port), timeout=HOLD_S + 5) as sock:
        sock.sendall(data)
        while chunk := sock.recv(65536):
            types.append(chunk[0])
            if chunk[0] == A_ASSOCIATE_AC:
                break
    return types, time.monotonic() - started


def hold_write_lock(db: str, ready: threading.Event, seconds: float) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        ready.set()
        time.sleep(seconds)
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_answers_do_not_wait_for_a_busy_audit_database(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, extra_toml=f"association_request_timeout_s = {DEADLINE_S}\n").start()
    assert node.database_url.startswith("sqlite:///")
    ready = threading.Event()
    holder = threading.Thread(
        target=hold_write_lock, args=(node.database_url.removeprefix("sqlite:///"), ready, HOLD_S)
    )
    holder.start()
    try:
        assert ready.wait(10), "could not take the write lock"
        cases = {
            "truncated request": _associate_rq()[:40],
            "unknown called AE": _associate_rq(called="NOTME"),
            "valid request": _associate_rq(),
        }
        answers = {}
        for name, data in cases.items():
            answers[name] = ask(node.port, data)
        lock_still_held = holder.is_alive()
    finally:
        holder.join()
    for name, (_, seconds) in answers.items():
        assert seconds < ANSWER_WITHIN_S, f"{name}: answered after {seconds:.1f} s"
    assert lock_still_held, f"the lock was released before every question was answered: {answers}"
    assert answers["truncated request"][0] in ([A_ABORT], [])
    assert answers["unknown called AE"][0] == [A_ASSOCIATE_RJ]
    assert answers["valid request"][0] == [A_ASSOCIATE_AC]

    # Once the database is free the rows follow: nothing went unaudited.
    store = node.store()

    def audited() -> bool:
        dropped = store.list_events(kinds=["connection.dropped"])
        rejected = [a for a in store.list_associations() if a.result == "rejected"]
        return any("association request not complete" in e.detail["reason"] for e in dropped) and any(
            "called AE title not recognised: 'NOTME'" in (a.reason or "") for a in rejected
        )

    wait_for(audited, 30, "the dropped connection and the rejected association to be audited")
    assert node.stop() == 0
