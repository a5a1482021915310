"""During a slow-connection attack a real modality still stores and gets its results (issue 13).

Slow sockets on 127.0.0.1 keep the node's waiting slots full for the whole test (each one dropped at the
request deadline is replaced at once); meanwhile storescu sends a chest CR, the embedded worker (tiny
models, as in test_pipeline) analyses it and the SEG and SR reach a storescp destination. Bounded: at
most 6 slow sockets at a time, 300 in all.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.test_pipeline import node_toml, tiny_weights, wait_final, worker_env  # noqa: F401 (fixtures)
from tests.support.dcmtk import StoreSCP, echoscu, storescu
from tests.support.node import NodeProcess
from tests.support.paths import dicom_dir

pytestmark = pytest.mark.timeout(600)

LIMITS = (
    "association_request_timeout_s = 3\nmax_pending_associations = 4\nmax_connections_per_peer = 6\n"
    "max_associations = 6\n"
)


class SlowAttack(threading.Thread):
    """Keeps `width` connections dripping a partial A-ASSOCIATE-RQ, one byte a second each."""

    def __init__(self, port: int, width: int = 6, limit: int = 300) -> None:
        super().__init__(daemon=True)
        self.port, self.width, self.limit = port, width, limit
        self.opened = 0
        self.stop = threading.Event()

    def _open(self) -> socket.socket | None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            sock.sendall(struct.pack(">BBLHH", 0x01, 0, 200, 1, 0))
        except OSError:
            return None
        self.opened += 1
        return sock

    def run(self) -> None:
        sockets: list[socket.socket] = []
        while not self.stop.is_set():
            alive = []
            for s in sockets:
                try:
                    s.send(b"A")
                    alive.append(s)
                except OSError:
                    s.close()
            while len(alive) < self.width and self.opened < self.limit:
                if (s := self._open()) is None:
                    break
                alive.append(s)
            sockets = alive
            self.stop.wait(1.0)
        for s in sockets:
            s.close()


def test_a_modality_gets_results_during_a_slow_connection_attack(tmp_path: Path) -> None:
    pacs = StoreSCP(tmp_path / "pacs", ae_title="PACS")
    extra = f'\n[[ae]]\nname = "PACS"\nhost = "127.0.0.1"\nport = {pacs.port}\nrole = "destination"\n'
    node = NodeProcess(tmp_path, extra_toml=LIMITS + node_toml(["PACS"], extra_ae=extra), analysis=True)
    attack: SlowAttack | None = None
    try:
        with pacs:
            node.start()
            attack = SlowAttack(node.port)
            attack.start()
            time.sleep(2)  # the slow sockets are in place
            assert echoscu(node.port).returncode == 0
            sent = storescu(node.port, [dicom_dir() / "02_cr_implicit_le_12bit.dcm"])
            assert sent.status == 0x0000, sent.output[-2000:]
            states = wait_final(node, 1, timeout=300)
            assert list(states.values()) == ["exported"]
            assert len(list((tmp_path / "pacs").iterdir())) == 2  # SEG and SR
            assert attack.opened > attack.width  # the node kept dropping them, the attack kept coming
    finally:
        if attack is not None:
            attack.stop.set()
            attack.join(10)
        node.close()
    drops = node.store().list_events(kinds=["connection.dropped"])
    assert drops and all(e.detail["peer"].startswith("127.0.0.1:") for e in drops)
