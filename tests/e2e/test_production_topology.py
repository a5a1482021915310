"""The documented production topology on loopback, with faults (issue 17, "Tested production path").

PostgreSQL, Redis (append-only file on), the node started by the shipped systemd unit's command lines
(`cxrnode config check` then `cxrnode serve` on deploy/config/cxrnode.production.toml, DICOM TLS with
client certificates; secrets and host-specific values as environment overrides, as `cxrnode.env`
gives them), two inference workers started the two documented ways (`cxrnode worker --config …
--hostname` and the shipped worker unit's ExecStart), and a TLS storescp as the PACS that sends and
receives the results. Faults: kill -9 of a whole worker mid-stream, SIGTERM and restart of the node
mid-stream, Redis down while images arrive. Counts in = counts out: every instance analysed and its
SEG and SR delivered once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from node.audit import AuditStore, InstanceFilter
from tests.support.dcmtk import storescu
from tests.support.net import free_port, port_open, wait_for
from tests.support.node import cxrnode_command
from tests.support.pg import PostgresServer
from tests.support.procs import PRODUCTION, Proc, unit_command
from tests.support.redis import RedisServer
from tests.support.synthetic_dicom import small_chest_copies
from tests.support.tiny_models import write_tiny_weights

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(900)]

LEASE_S = 8  # broker.lease_s, short so that the test takes seconds (production default: 60)
REDIS_DOWN_S = 15
SEG, SR = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.33"


def self_signed(dir_: Path, name: str) -> tuple[Path, Path]:
    key, cert = dir_ / f"{name}.key", dir_ / f"{name}.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return key, cert


@pytest.fixture
def site(tmp_path: Path, postgres_server: PostgresServer) -> Iterator[dict[str, object]]:
    redis = RedisServer(persistent=True).start()  # appendonly, as docs/operations.md says
    node_key, node_cert = self_signed(tmp_path, "cxrnode")
    pacs_key, pacs_cert = self_signed(tmp_path, "pacs")
    trusted = tmp_path / "trusted.crt"  # the PACS's certificate: it calls us and receives our results
    trusted.write_text(pacs_cert.read_text())
    out = tmp_path / "received"
    out.mkdir()
    pacs_port = free_port()
    pacs = Proc("pacs", ["storescp", "-aet", "STORESCU", "+tls", str(pacs_key), str(pacs_cert), "-ic", "-od", str(out),
                         str(pacs_port)], dict(os.environ), tmp_path / "pacs.log").start()
    wait_for(lambda: port_open(pacs_port), 15, "the TLS storescp")
    weights = write_tiny_weights(tmp_path / "weights", size=448,
                                 head_logits={"lung": (6.0, None), "opacity": (6.0, None), "pneumothorax": (-6.0, -6.0)})
    port = free_port()
    env = {
        **os.environ, "PYTHONUNBUFFERED": "1",
        # What /etc/cxrnode/cxrnode.env and worker.env hold on a real site (one file for node and workers).
        "CXRNODE_DATABASE__URL": postgres_server.create_database(),
        "CXRNODE_BROKER__URL": redis.url,
        "CXRNODE_BROKER__RESULT_BACKEND": redis.url.rsplit("/", 1)[0] + "/1",
        "CXRNODE_BROKER__LEASE_S": str(LEASE_S),
        "CXRNODE_DICOM__HOST": "127.0.0.1", "CXRNODE_DICOM__PORT": str(port),
        "CXRNODE_DICOM__TLS__CERT_FILE": str(node_cert), "CXRNODE_DICOM__TLS__KEY_FILE": str(node_key),
        "CXRNODE_DICOM__TLS__CA_FILE": str(trusted),
        "CXRNODE_STORAGE__DATA_DIR": str(tmp_path / "var"), "CXRNODE_STORAGE__MIN_FREE_MB": "1",
        "CXRNODE_WEB__HOST": "127.0.0.1", "CXRNODE_WEB__PORT": str(free_port()),
        "CXRNODE_AE": json.dumps([{"name": "STORESCU", "host": "127.0.0.1", "port": pacs_port, "role": "both",
                                   "tls": True}]),
        "CXRNODE_WEIGHTS_DIR": str(weights), "CXRNODE_CACHE": str(tmp_path / "cache"), "CXRNODE_WORKER_THREADS": "1",
    }
    yield {"env": env, "port": port, "out": out, "root": tmp_path, "pacs_cert": pacs_cert, "pacs_key": pacs_key,
           "node_cert": node_cert, "pacs": pacs, "redis": redis}
    pacs.stop()
    redis.stop()


def test_documented_topology_survives_a_killed_worker_and_a_node_restart(site: dict[str, object]) -> None:
    env, port, out, root = site["env"], site["port"], site["out"], site["root"]
    assert isinstance(env, dict) and isinstance(port, int) and isinstance(out, Path) and isinstance(root, Path)
    config = ["--config", str(PRODUCTION)]
    check = subprocess.run(unit_command("cxrnode.service", "ExecStartPre"), env=env, capture_output=True, text=True,
                           timeout=120)
    assert check.returncode == 0, check.stderr
    node = Proc("node", unit_command("cxrnode.service", "ExecStart"), env, root / "serve.log").start()
    workers = [
        Proc("gpu0", [*cxrnode_command(), "worker", *config, "--hostname", "gpu0@%h"], env, root / "gpu0.log"),
        Proc("gpu1", unit_command("cxrnode-worker@.service", "ExecStart", instance="1"), env, root / "gpu1.log"),
    ]
    store: AuditStore | None = None
    try:
        wait_for(lambda: "running on" in node.text() or not node.alive(), 90, "cxrnode serve")
        assert node.alive(), node.text()[-3000:]
        for w in workers:
            w.start()
        for w in workers:
            wait_for(lambda w=w: "loaded model pneumothorax" in w.text() or not w.alive(), 180, f"{w.name} ready")
            assert w.alive(), w.text()[-3000:]

        files = small_chest_copies(root / "send", 40)
        tls = ["+tls", str(site["pacs_key"]), str(site["pacs_cert"]), "+cf", str(site["node_cert"])]
        started = time.monotonic()
        first = storescu(port, files[:20], opts=tls)
        assert first.statuses == [0] * 20, first.output[-2000:]
        # Fault 1: a whole worker (main process and pool) killed while it analyses.
        wait_for(lambda: "analysing" in workers[0].text(), 120, "gpu0 to take a job")
        workers[0].kill9()
        killed_at = time.monotonic()
        job = re.findall(r"job (\S+): analysing", workers[0].text())[-1]
        if f"job {job}: analysed" not in workers[0].text():  # killed mid-task: the other worker takes it over
            wait_for(lambda: f"job {job}: analysed" in workers[1].text(), 120, "gpu1 to run the killed worker's job")
        recovered_s = time.monotonic() - killed_at
        # Fault 2: the node stopped (SIGTERM) and started again while work is in flight.
        assert node.stop() == 0, node.text()[-3000:]
        node.start()
        wait_for(lambda: node.text().count("running on") >= 2 or not node.alive(), 90, "cxrnode serve again")
        second = storescu(port, files[20:30], opts=tls)
        assert second.statuses == [0] * 10, second.output[-2000:]
        # Fault 3: Redis down while instances keep arriving; its append-only file keeps the queues.
        redis = site["redis"]
        assert isinstance(redis, RedisServer) and redis.proc is not None
        redis.proc.terminate()
        redis.proc.wait(10)
        third = storescu(port, files[30:], opts=tls)
        assert third.statuses == [0] * 10, third.output[-2000:]  # persisted and acknowledged regardless
        time.sleep(REDIS_DOWN_S)
        redis.dir.mkdir(parents=True, exist_ok=True)
        redis.start()  # same port

        store = AuditStore.open(str(env["CXRNODE_DATABASE__URL"]))

        def all_exported() -> bool:
            assert node.alive(), node.text()[-3000:]
            rows = store.list_instances(InstanceFilter())  # type: ignore[union-attr]
            return len(rows) == 40 and all(r.state == "exported" for r in rows)

        wait_for(all_exported, 300, "every instance exported")
        done = time.monotonic()
        # Counts in = counts out: one SEG and one SR per instance, each once, all over TLS.
        wait_for(lambda: len(list(out.iterdir())) >= 80, 60, "the PACS to have every result")
        time.sleep(LEASE_S + 5)  # a late duplicate would land now
        received = [pydicom.dcmread(p, stop_before_pixels=True) for p in out.iterdir()]
        kinds = Counter(str(d.SOPClassUID) for d in received)
        assert kinds == {SEG: 40, SR: 40}, kinds
        sources = Counter(str(d.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID)
                          for d in received if str(d.SOPClassUID) == SEG)
        sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        assert set(sources) == sent and set(sources.values()) == {1}
        assert all(a.tls for a in store.list_associations() if a.direction == "outbound")
        assert "job " in workers[1].text() and workers[1].alive()
        sys.stdout.write(f"\n40 instances in, 80 results out in {done - started:.0f} s; worker killed "
                         f"{killed_at - started:.0f} s in, its job done by the other {recovered_s:.0f} s later "
                         f"(lease {LEASE_S} s); node restarted once; Redis down {REDIS_DOWN_S} s\n")
    finally:
        if store is not None:
            store.close()
        for w in workers:
            w.stop()
        node.stop()
