"""Two nodes for availability (issue 17): HAProxy in front of two `cxrnode serve`, one node killed mid-stream.

The shipped deploy/haproxy/haproxy.cfg (addresses and ports replaced for loopback) balances DICOM over
two nodes started with the shipped production configuration and unit command line, each with its own
data directory and node name, sharing PostgreSQL and Redis; two inference workers; a storescp as the
PACS (unique file names, so a result delivered twice would show as a second file) and a webhook as the
triage alert destination. A modality sends 40 instances in small associations through the balancer;
one node is killed (kill -9, its whole process group) while images arrive. The modality resends what
was not acknowledged, and keeps sending: the survivor takes everything new. While the dead node is
down its acknowledged images wait (their files are on its disk); the survivor does not touch them.
Restarted, it completes them. Counts in = counts out: every acknowledged instance analysed once, one
SEG and one SR each, every alert once, and the audit log says which node did what.
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
from pynetdicom import AE
from pynetdicom.association import Association

from node.audit import AuditStore, InstanceFilter, InstanceState
from tests.support.dcmtk import storescu
from tests.support.http_receiver import HTTPReceiver
from tests.support.net import free_port, port_open, wait_for
from tests.support.node import cxrnode_command
from tests.support.paths import REPO_ROOT
from tests.support.pg import PostgresServer
from tests.support.procs import PRODUCTION, Proc, unit_command
from tests.support.redis import RedisServer
from tests.support.summaries import check_chains, reports_issued, settled, split
from tests.support.synthetic_dicom import small_chest_copies
from tests.support.tiny_models import write_tiny_weights

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(900)]

HAPROXY_CFG = REPO_ROOT / "deploy" / "haproxy" / "haproxy.cfg"
SEG, SR = "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.33"
SECRET = "two-nodes-webhook-secret"
LEASE_S = 8
N, BATCH = 40, 4  # instances, instances per association (a study is 10: studies span both nodes)


def loopback_haproxy(text: str, port: int, servers: dict[str, int]) -> str:
    """The shipped HAProxy configuration with the frontend on `port` and the servers on loopback ports
    (nothing else changed: the test runs the file the docs ship)."""
    text, n = re.subn(r"^(\s*)bind :11112$", rf"\1bind 127.0.0.1:{port}", text, flags=re.M)
    assert n == 1, "deploy/haproxy/haproxy.cfg: no `bind :11112` line"
    text = re.sub(r"^\s*log /dev/log.*$", "", text, flags=re.M)  # no syslog socket here
    for name, node_port in servers.items():
        text, n = re.subn(rf"^(\s*server {name}) \S+:11112", rf"\1 127.0.0.1:{node_port}", text, flags=re.M)
        assert n == 1, f"deploy/haproxy/haproxy.cfg: no `server {name}` line"
    return text


@pytest.fixture
def site(tmp_path: Path, postgres_server: PostgresServer) -> Iterator[dict[str, object]]:
    redis = RedisServer(persistent=True).start()
    out = tmp_path / "received"
    out.mkdir()
    pacs_port = free_port()
    pacs = Proc(
        "pacs",
        ["storescp", "-aet", "STORESCU", "+uf", "-od", str(out), str(pacs_port)],
        dict(os.environ),
        tmp_path / "pacs.log",
    ).start()
    wait_for(lambda: port_open(pacs_port), 15, "storescp")
    hook = HTTPReceiver(tmp_path / "hook", "webhook", secret=SECRET).start()
    weights = write_tiny_weights(
        tmp_path / "weights",
        size=448,
        head_logits={"lung": (6.0, None), "opacity": (6.0, None), "pneumothorax": (-6.0, -6.0)},
    )
    common = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "CXRNODE_DATABASE__URL": postgres_server.create_database(),
        "CXRNODE_BROKER__URL": redis.url,
        "CXRNODE_BROKER__RESULT_BACKEND": redis.url.rsplit("/", 1)[0] + "/1",
        "CXRNODE_BROKER__LEASE_S": str(LEASE_S),
        "CXRNODE_DICOM__HOST": "127.0.0.1",
        "CXRNODE_DICOM__TLS__ENABLED": "false",
        "CXRNODE_DICOM__LISTENERS": "1",
        "CXRNODE_DICOM__PROXY_PROTOCOL_FROM": '["127.0.0.1"]',  # the balancer sends PROXY v2 headers
        "CXRNODE_STORAGE__MIN_FREE_MB": "1",
        "CXRNODE_WEB__HOST": "127.0.0.1",
        "CXRNODE_AE": json.dumps([{"name": "STORESCU", "host": "127.0.0.1", "port": pacs_port, "role": "both"}]),
        "CXRNODE_TRIAGE__STABLE_S": "4",
        "CXRNODE_TRIAGE__DESTINATIONS": json.dumps(
            [{"name": "hook", "type": "webhook", "url": hook.url, "secret": SECRET}]
        ),
        # Every level alerts, so that every study gives exactly one alert to count.
        "CXRNODE_TRIAGE__ROUTES": json.dumps({"routine": ["hook"], "urgent": ["hook"], "critical": ["hook"]}),
        "CXRNODE_WEIGHTS_DIR": str(weights),
        "CXRNODE_CACHE": str(tmp_path / "cache"),
        "CXRNODE_WORKER_THREADS": "1",
    }
    nodes = {}
    for name in ("node-a", "node-b"):
        env = {
            **common,
            "CXRNODE_NODE__NAME": name,
            "CXRNODE_DICOM__PORT": str(free_port()),
            "CXRNODE_STORAGE__DATA_DIR": str(tmp_path / name),
            "CXRNODE_WEB__PORT": str(free_port()),
        }
        nodes[name] = env
    balancer_port = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        loopback_haproxy(
            HAPROXY_CFG.read_text(), balancer_port, {n: int(e["CXRNODE_DICOM__PORT"]) for n, e in nodes.items()}
        )
    )
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    yield {
        "common": common,
        "nodes": nodes,
        "out": out,
        "root": tmp_path,
        "hook": hook,
        "haproxy_cfg": cfg,
        "port": balancer_port,
    }
    hook.stop()
    pacs.stop()
    redis.stop()


class Modality:
    """Sends through the balancer in small associations, resending whatever was not acknowledged
    (as a modality's queue does), until every file is acknowledged."""

    def __init__(self, port: int, files: list[Path]) -> None:
        self.port, self.files = port, files
        self.acked: set[Path] = set()
        self.associations = self.failed_associations = 0
        self._failed: list[Association] = []
        self.local_ports: list[int] = []  # source ports of the associations opened here

    def open(self) -> Association:
        """An association through the balancer, kept open (pynetdicom, as a modality holds one)."""
        ae = AE(ae_title="STORESCU")
        ds = pydicom.dcmread(self.files[0], stop_before_pixels=True)
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
        assoc = ae.associate("127.0.0.1", self.port, ae_title="CXRNODE")
        assert assoc.is_established
        self.associations += 1
        assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
        self.local_ports.append(assoc.dul.socket.socket.getsockname()[1])
        return assoc

    def store(self, assoc: Association, files: list[Path]) -> None:
        """Send on an open association; a file without a success response stays unacknowledged."""
        for f in files:
            try:
                rsp = assoc.send_c_store(f) if assoc.is_established else None
            except (RuntimeError, OSError):
                rsp = None
            if rsp is not None and rsp.get("Status") == 0:
                self.acked.add(f)
            elif assoc not in self._failed:
                self._failed.append(assoc)
                self.failed_associations += 1

    def send(self, batch: list[Path]) -> None:
        """storescu on new associations until the whole batch is acknowledged."""
        pending = [f for f in batch if f not in self.acked]
        for _ in range(20):
            if not pending:
                return
            result = storescu(self.port, pending, timeout=120)
            self.associations += 1
            ok = [f for f, status in zip(pending, result.statuses, strict=False) if status == 0]
            self.acked.update(ok)
            if len(ok) < len(pending):
                self.failed_associations += 1
                time.sleep(1)
            pending = [f for f in pending if f not in self.acked]
        raise AssertionError(f"{len(pending)} file(s) never acknowledged")


def test_two_nodes_behind_haproxy_survive_a_killed_node(site: dict[str, object]) -> None:  # noqa: C901 — one scripted scenario
    nodes_env, out, root, hook = site["nodes"], site["out"], site["root"], site["hook"]
    assert isinstance(nodes_env, dict) and isinstance(out, Path) and isinstance(root, Path)
    assert isinstance(hook, HTTPReceiver)
    common = site["common"]
    assert isinstance(common, dict)
    serve = unit_command("cxrnode.service", "ExecStart")
    nodes = {name: Proc(name, serve, env, root / f"{name}.log") for name, env in nodes_env.items()}
    workers = [
        Proc(
            f"gpu{i}",
            [*cxrnode_command(), "worker", "--config", str(PRODUCTION), "--hostname", f"gpu{i}@%h"],
            common,
            root / f"gpu{i}.log",
        )
        for i in range(2)
    ]
    balancer = Proc(
        "haproxy", ["haproxy", "-db", "-f", str(site["haproxy_cfg"])], dict(os.environ), root / "haproxy.log"
    )
    store: AuditStore | None = None
    try:
        for n in nodes.values():
            n.start()
        for w in workers:
            w.start()
        for n in nodes.values():
            wait_for(lambda n=n: "running on" in n.text() or not n.alive(), 120, f"{n.name} serving")
            assert n.alive(), n.text()[-3000:]
        for w in workers:
            wait_for(lambda w=w: "loaded model pneumothorax" in w.text() or not w.alive(), 240, f"{w.name} ready")
            assert w.alive(), w.text()[-3000:]
        balancer.start()
        port = site["port"]
        assert isinstance(port, int)
        wait_for(lambda: port_open(port), 15, "haproxy")
        time.sleep(2.5)  # both servers checked up

        files = small_chest_copies(root / "send", N)
        modality = Modality(port, files)
        store = AuditStore.open(str(common["CXRNODE_DATABASE__URL"]))
        batches = [files[i : i + BATCH] for i in range(0, N, BATCH)]
        for batch in batches[:4]:
            modality.send(batch)
        # Node A dies (kill -9, with its node-queue worker) in the middle of an association: two
        # associations open through the balancer (one lands on each node), two images each, the kill,
        # then the rest of each batch on the same associations; the modality resends what was not
        # acknowledged on new associations.
        victim = nodes["node-a"]
        round2 = batches[4] + batches[5]
        open_assocs = [modality.open() for _ in range(2)]
        for assoc, batch in zip(open_assocs, (batches[4], batches[5]), strict=True):
            modality.store(assoc, batch[:2])
        owners = {i.node for i in store.list_instances(InstanceFilter()) if i.sop_instance_uid in _uids(round2)}
        assert owners == {"node-a", "node-b"}, owners
        victim.kill9()
        killed_at = time.monotonic()
        for assoc, batch in zip(open_assocs, (batches[4], batches[5]), strict=True):
            modality.store(assoc, batch[2:])
            assoc.release()
        assert modality.failed_associations >= 1, "the kill cut no association"
        for batch in (batches[4], batches[5]):
            modality.send(batch)
        for batch in batches[6:]:
            modality.send(batch)
        assert modality.acked == set(files)
        # The nodes saw the modality's own source port (PROXY v2 from the balancer), not the balancer's.
        inbound = {a.peer_port for a in store.list_associations() if a.direction == "inbound"}
        assert set(modality.local_ports) <= inbound, (modality.local_ports, sorted(inbound))
        sent_while_down = time.monotonic() - killed_at

        # While node-a is down, node-b completes its own instances and leaves node-a's alone.
        rows = store.list_instances(InstanceFilter())
        on_a = {i.id for i in rows if i.node == "node-a" and i.state not in ("duplicate", "rejected")}
        on_b = {i.id for i in rows if i.node == "node-b" and i.state not in ("duplicate", "rejected")}
        assert on_a and on_b, (len(on_a), len(on_b))

        def b_done() -> bool:
            return all(
                i.state == InstanceState.EXPORTED for i in store.list_instances(InstanceFilter()) if i.id in on_b
            )

        wait_for(b_done, 300, "node-b to export every instance it received")
        a_rows = [i for i in store.list_instances(InstanceFilter()) if i.id in on_a]
        a_waiting = [i.id for i in a_rows if i.state != InstanceState.EXPORTED]
        assert all(e.node == "node-a" for i in a_rows for e in store.list_exports(i.id))
        for ev in store.list_events(kinds=["export.sent", "instance.analyzed", "analysis.published"]):
            if ev.instance_id in on_a:
                assert ev.node == "node-a", (ev.kind, ev.instance_id, ev.node)

        # node-a back (systemd's Restart=): it completes what it acknowledged before it died.
        victim.start()
        restarted_at = time.monotonic()
        wait_for(lambda: victim.text().count("running on") >= 2 or not victim.alive(), 120, "node-a again")
        assert victim.alive(), victim.text()[-3000:]

        live_uids = _uids(files)

        def all_exported() -> bool:
            live = [i for i in store.list_instances(InstanceFilter()) if i.state not in ("duplicate", "rejected")]
            return len(live) == N and all(i.state == InstanceState.EXPORTED for i in live)

        wait_for(all_exported, 300, "every acknowledged instance exported")
        completed_s = time.monotonic() - restarted_at
        wait_for(lambda: settled(store, N // 10), 120, "every study's summary SR sent")
        wait_for(lambda: len(list(out.iterdir())) >= 2 * N + reports_issued(store), 60, "the PACS to have every result")
        wait_for(lambda: len(hook.requests()) >= N // 10, 120, "an alert for every study")
        time.sleep(LEASE_S + 6)  # a duplicate result or alert would arrive now

        # Counts in = counts out: one SEG and one SR per acknowledged instance, each exactly once, and the
        # studies' summary SRs, each revision once.
        images, summaries = split(pydicom.dcmread(p, stop_before_pixels=True) for p in out.iterdir())
        kinds = Counter(str(d.SOPClassUID) for d in images)
        assert kinds == {SEG: N, SR: N}, kinds
        assert len(check_chains(summaries)) == N // 10 and len(summaries) == reports_issued(store)
        sources = Counter(
            str(d.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID)
            for d in images
            if str(d.SOPClassUID) == SEG
        )
        assert set(sources) == live_uids and set(sources.values()) == {1}
        live = [i for i in store.list_instances(InstanceFilter()) if i.state not in ("duplicate", "rejected")]
        assert Counter(i.sop_instance_uid for i in live) == Counter(live_uids)
        for i in live:
            analysed = store.list_events(instance_id=i.id, kinds=["instance.analyzed"])
            assert len(analysed) == 1, (i.id, len(analysed))
            assert analysed[0].node == i.node and {e.node for e in store.list_exports(i.id)} == {i.node}

        # Alerts: each study decided by its owner and alerted once, by one node.
        bodies = [json.loads(str(r["body"])) for r in hook.requests() if r.get("answer", 200) == 200]
        per_study = Counter((b["study_instance_uid"], b["revision"]) for b in bodies)
        assert len({b["alert_id"] for b in bodies}) == len(bodies), "an alert was delivered twice"
        assert set(per_study.values()) == {1}, per_study
        studies = {s.study.study_instance_uid: s for s in store.list_studies()}
        assert {uid for uid, _ in per_study} == set(studies)
        for ev in store.list_events(kinds=["triage.decided"]):
            owner = next(s.study.node for s in studies.values() if s.study.id == ev.study_id)
            assert ev.node == owner
        spanning = [s for s in studies.values() if len(s.nodes) == 2]
        assert spanning, "no study with images on both nodes"

        # The CLI says which node did what.
        cli = subprocess.run(
            [*cxrnode_command(), "audit", "studies", "--config", str(PRODUCTION)],
            env=nodes_env["node-b"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        assert "node-a,node-b" in cli.stdout, cli.stdout
        sys.stdout.write(
            f"\n{N} instances in over {modality.associations} associations "
            f"({modality.failed_associations} cut by the kill and resent); node-a killed, "
            f"{len(on_a)} of its instances ({len(a_waiting)} still waiting while it was down) completed "
            f"{completed_s:.0f} s after its restart; {2 * N} results out, once each; "
            f"{len(bodies)} alerts, once each; "
            f"sending after the kill took {sent_while_down:.0f} s\n"
        )
    finally:
        if store is not None:
            store.close()
        balancer.stop()
        for w in workers:
            w.stop()
        for n in nodes.values():
            n.stop()


def _uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
