"""The documented production topology on loopback, with faults (issue 17, "Tested production path").

The production quick start of docs/operations.md, run as written (no drift between the docs and this
test): its console password hash line, its env block (writing cxrnode.env and worker.env; the
documented loopback PostgreSQL and Redis addresses replaced by the test servers') and its run block
line by line: `systemctl enable --now` starts each unit's shipped command lines (`cxrnode config
check`, `cxrnode serve` on deploy/config/cxrnode.production.toml with DICOM TLS and client
certificates; two `cxrnode-worker@N` workers) with the env files as systemd reads them, and the admin
commands run as written (`config check`, a TLS C-ECHO to the PACS, `audit studies`). A line the test
does not know fails it. What the edited cxrnode.toml would hold on a real host (addresses, TLS files,
the PACS entry) is given as environment overrides. A TLS storescp is the PACS that sends and receives
the results. Faults: kill -9 of a whole worker mid-stream, SIGTERM and restart of the node
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
from tests.support.pg import PostgresServer
from tests.support.procs import Proc, QuickStart, docs_block, install_line, unit_command
from tests.support.redis import RedisServer
from tests.support.summaries import check_chains, reports_issued, settled, split
from tests.support.synthetic_dicom import small_chest_copies
from tests.support.tiny_models import write_tiny_weights
from tests.support.tls import self_signed
from tests.support.validators import dciodvfy

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(900)]

LEASE_S = 8  # broker.lease_s, short so that the test takes seconds (production default: 60)
REDIS_DOWN_S = 15
SEG, SR = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.33"


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
    pacs = Proc(
        "pacs",
        ["storescp", "-aet", "PACS", "+tls", str(pacs_key), str(pacs_cert), "-ic", "-od", str(out), str(pacs_port)],
        dict(os.environ),
        tmp_path / "pacs.log",
    ).start()
    wait_for(lambda: port_open(pacs_port), 15, "the TLS storescp")
    weights = write_tiny_weights(
        tmp_path / "weights",
        size=448,
        head_logits={"lung": (6.0, None), "opacity": (6.0, None), "pneumothorax": (-6.0, -6.0)},
    )
    port = free_port()
    # The quick start's env block, run as written: the documented loopback PostgreSQL and Redis
    # addresses become the test servers' (PostgreSQL trusts loopback here: PGPASSWORD is not used).
    quick = QuickStart(tmp_path / "etc")
    hashed = quick.sh(install_line("HASH=") + '\nprintf "%s" "$HASH"', {**os.environ, "PW": "console secret"})
    assert hashed.returncode == 0 and hashed.stdout.startswith("pbkdf2_sha256$"), hashed.stderr
    database_url = postgres_server.create_database()
    quick.write_env_files(
        {**os.environ, "HASH": hashed.stdout, "DBPW": "not used (trust)"},
        {
            "postgresql+psycopg://cxrnode@127.0.0.1:5432/cxrnode": database_url,
            "redis://127.0.0.1:6379/": redis.url.rsplit("/", 1)[0] + "/",
        },
    )
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        # What the edited /etc/cxrnode/cxrnode.toml holds on a real site: this host's addresses, files, peers.
        "CXRNODE_BROKER__LEASE_S": str(LEASE_S),
        "CXRNODE_DICOM__HOST": "127.0.0.1",
        "CXRNODE_DICOM__PORT": str(port),
        "CXRNODE_DICOM__TLS__CERT_FILE": str(node_cert),
        "CXRNODE_DICOM__TLS__KEY_FILE": str(node_key),
        "CXRNODE_DICOM__TLS__CA_FILE": str(trusted),
        "CXRNODE_STORAGE__DATA_DIR": str(tmp_path / "var"),
        "CXRNODE_STORAGE__MIN_FREE_MB": "1",
        "CXRNODE_WEB__HOST": "127.0.0.1",
        "CXRNODE_WEB__PORT": str(free_port()),
        "CXRNODE_AE": json.dumps(
            [{"name": "PACS", "host": "127.0.0.1", "port": pacs_port, "role": "both", "tls": True}]
        ),
        "CXRNODE_WEIGHTS_DIR": str(weights),
        "CXRNODE_CACHE": str(tmp_path / "cache"),
        "CXRNODE_WORKER_THREADS": "1",
    }
    yield {
        "env": env,
        "quick": quick,
        "database_url": database_url,
        "port": port,
        "out": out,
        "root": tmp_path,
        "pacs_cert": pacs_cert,
        "pacs_key": pacs_key,
        "node_cert": node_cert,
        "pacs": pacs,
        "redis": redis,
    }
    pacs.stop()
    redis.stop()


def test_documented_topology_survives_a_killed_worker_and_a_node_restart(site: dict[str, object]) -> None:  # noqa: C901 — one scripted scenario
    env, port, out, root = site["env"], site["port"], site["out"], site["root"]
    assert isinstance(env, dict) and isinstance(port, int) and isinstance(out, Path) and isinstance(root, Path)
    quick = site["quick"]
    assert isinstance(quick, QuickStart)
    node_env, worker_env = {**env, **quick.env_file("cxrnode.env")}, {**env, **quick.env_file("worker.env")}
    assert node_env["CXRNODE_WEB__PASSWORD_HASH"].startswith("pbkdf2_sha256$")  # the `$`s survived sh and systemd
    node: Proc | None = None
    workers: list[Proc] = []
    store: AuditStore | None = None
    try:
        # The quick start's run block, line by line: units started as systemd would, admin commands as written.
        for line in docs_block("run").splitlines():
            if not line.strip() or line == "systemctl daemon-reload":
                continue
            if started := re.fullmatch(r"systemctl enable --now (.+)", line):
                for unit in started.group(1).split():
                    if unit == "cxrnode.service":
                        check = subprocess.run(
                            unit_command(unit, "ExecStartPre"),
                            env=node_env,
                            capture_output=True,
                            text=True,
                            timeout=120,
                        )
                        assert check.returncode == 0, check.stderr
                        node = serving = Proc(
                            "node", unit_command(unit, "ExecStart"), node_env, root / "serve.log"
                        ).start()
                        wait_for(lambda p=serving: "running on" in p.text() or not p.alive(), 90, "cxrnode serve")
                        assert serving.alive(), serving.text()[-3000:]
                    else:
                        worker = re.fullmatch(r"cxrnode-worker@(\d+)\.service", unit)
                        assert worker is not None, f"the quick start starts a unit the test does not know: {unit}"
                        workers.append(
                            Proc(
                                f"gpu{worker.group(1)}",
                                unit_command("cxrnode-worker@.service", "ExecStart", instance=worker.group(1)),
                                worker_env,
                                root / f"gpu{worker.group(1)}.log",
                            ).start()
                        )
            elif admin := re.fullmatch(r"sudo -u cxrnode sh -c '(.+)'", line):
                done = quick.sh(admin.group(1), env)  # the env file is read by the command itself
                assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}"
            else:
                raise AssertionError(f"docs/operations.md quick start: a line this test does not run: {line}")
        assert node is not None and len(workers) == 2, "the quick start no longer starts the node and two workers"
        for w in workers:
            wait_for(lambda w=w: "loaded model pneumothorax" in w.text() or not w.alive(), 180, f"{w.name} ready")
            assert w.alive(), w.text()[-3000:]

        files = small_chest_copies(root / "send", 40)
        tls = ["+tls", str(site["pacs_key"]), str(site["pacs_cert"]), "+cf", str(site["node_cert"])]
        started = time.monotonic()
        first = storescu(port, files[:20], aet="PACS", opts=tls)
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
        second = storescu(port, files[20:30], aet="PACS", opts=tls)
        assert second.statuses == [0] * 10, second.output[-2000:]
        # Fault 3: Redis down while instances keep arriving; its append-only file keeps the queues.
        redis = site["redis"]
        assert isinstance(redis, RedisServer) and redis.proc is not None
        redis.proc.terminate()
        redis.proc.wait(10)
        third = storescu(port, files[30:], aet="PACS", opts=tls)
        assert third.statuses == [0] * 10, third.output[-2000:]  # persisted and acknowledged regardless
        time.sleep(REDIS_DOWN_S)
        redis.dir.mkdir(parents=True, exist_ok=True)
        redis.start()  # same port

        store = audit = AuditStore.open(str(site["database_url"]))

        def all_exported() -> bool:
            assert node.alive(), node.text()[-3000:]
            rows = store.list_instances(InstanceFilter())  # type: ignore[union-attr]
            return len(rows) == 40 and all(r.state == "exported" for r in rows)

        wait_for(all_exported, 300, "every instance exported")
        done = time.monotonic()
        studies = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
        wait_for(lambda: settled(audit, len(studies)), 120, "every study's summary SR sent")
        # Counts in = counts out: one SEG and one SR per instance and the studies' summary SRs, each once,
        # all over TLS.
        wait_for(lambda: len(list(out.iterdir())) >= 80 + reports_issued(audit), 60, "the PACS to have every result")
        time.sleep(LEASE_S + 5)  # a late duplicate would land now
        images, summaries = split(pydicom.dcmread(p, stop_before_pixels=True) for p in out.iterdir())
        kinds = Counter(str(d.SOPClassUID) for d in images)
        assert kinds == {SEG: 40, SR: 40}, kinds
        assert set(check_chains(summaries)) == studies and len(summaries) == reports_issued(audit)
        sources = Counter(
            str(d.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID)
            for d in images
            if str(d.SOPClassUID) == SEG
        )
        sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        assert set(sources) == sent and set(sources.values()) == {1}
        for path in sorted(out.iterdir()):  # every result as the PACS got it (summaries too): dciodvfy finds nothing
            report = dciodvfy(path)
            assert (report.errors, report.warnings) == ([], []), report
        assert all(a.tls for a in store.list_associations() if a.direction == "outbound")
        assert "job " in workers[1].text() and workers[1].alive()
        sys.stdout.write(
            f"\n40 instances in, 80 results out in {done - started:.0f} s; worker killed "
            f"{killed_at - started:.0f} s in, its job done by the other {recovered_s:.0f} s later "
            f"(lease {LEASE_S} s); node restarted once; Redis down {REDIS_DOWN_S} s\n"
        )
    finally:
        if store is not None:
            store.close()
        for w in workers:
            w.stop()
        if node is not None:
            node.stop()
