"""The shipped production configuration runs: `cxrnode serve --config deploy/config/cxrnode.production.toml`
against a real PostgreSQL and Redis started on free ports, with DICOM TLS and client certificates.

Only what a site must change comes from the environment (hosts, ports, certificate paths, data dir,
the console password), exactly as compose.yaml and the systemd EnvironmentFile do it. Every test file
goes in over TLS; the audit rows land in PostgreSQL and the analysis hand-offs in Redis' `inference`
queue; the console's /readyz and /metrics report that state.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
from collections.abc import Iterator
from itertools import groupby
from pathlib import Path

import httpx
import pytest

from node.audit import AuditStore
from node.audit.models import InstanceState
from node.runtime.config import load_settings
from node.runtime.health import queue_depth
from node.web.server import start_in_thread
from tests.support.console import ADMIN, EXTRA_OPTS, PASSWORD, PASSWORD_HASH, RAW_SENDS, sop_instance_uid
from tests.support.dcmtk import echoscu, send_as_stored, storescu, storescu_opts
from tests.support.net import free_port, wait_for
from tests.support.node import cxrnode_command
from tests.support.paths import REPO_ROOT, dicom_dir, dicom_manifest
from tests.support.pg import PostgresServer
from tests.support.redis import RedisServer
from tests.support.tls import self_signed

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(300)]

PRODUCTION = REPO_ROOT / "deploy" / "config" / "cxrnode.production.toml"


class Deployment:
    def __init__(self, root: Path, env: dict[str, str], port: int, tls: dict[str, Path]) -> None:
        self.root, self.env, self.port, self.tls = root, env, port, tls
        self.log = root / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def tls_opts(self) -> list[str]:
        return ["+tls", str(self.tls["client_key"]), str(self.tls["client_cert"]), "+cf", str(self.tls["server_cert"])]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture(scope="module")
def deployment(
    postgres_server: PostgresServer, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("production")
    server_key, server_cert = self_signed(root, "cxrnode")
    client_key, client_cert = self_signed(root, "storescu")
    port = free_port()
    env = {
        "CXRNODE_DATABASE__URL": postgres_server.create_database(),
        "CXRNODE_BROKER__URL": redis_server.url,
        "CXRNODE_BROKER__RESULT_BACKEND": redis_server.url.rsplit("/", 1)[0] + "/1",
        "CXRNODE_DICOM__HOST": "127.0.0.1",
        "CXRNODE_DICOM__PORT": str(port),
        "CXRNODE_DICOM__TLS__CERT_FILE": str(server_cert),
        "CXRNODE_DICOM__TLS__KEY_FILE": str(server_key),
        "CXRNODE_DICOM__TLS__CA_FILE": str(client_cert),
        "CXRNODE_STORAGE__DATA_DIR": str(root / "var"),
        "CXRNODE_STORAGE__MIN_FREE_MB": "1",
        "CXRNODE_WEB__HOST": "127.0.0.1",
        "CXRNODE_WEB__PORT": str(free_port()),
        "CXRNODE_WEB__PASSWORD_HASH": PASSWORD_HASH,
        "CXRNODE_AE": json.dumps([{"name": "STORESCU", "host": "127.0.0.1", "role": "source"}]),
    }
    dep = Deployment(
        root, env, port, {"server_cert": server_cert, "client_key": client_key, "client_cert": client_cert}
    )
    with open(dep.log, "ab") as logf:
        dep.proc = subprocess.Popen(
            [*cxrnode_command(), "serve", "--config", str(PRODUCTION)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        )

    def listening() -> bool:
        if dep.proc is not None and dep.proc.poll() is not None:
            raise RuntimeError(f"cxrnode serve exited with {dep.proc.returncode}:\n{dep.log_text()}")
        return "listening as" in dep.log_text()

    try:
        wait_for(listening, 60, "cxrnode serve (production config) to listen")
        yield dep
    finally:
        dep.proc.send_signal(signal.SIGTERM)
        try:
            code = dep.proc.wait(60)
        except subprocess.TimeoutExpired:
            dep.proc.kill()
            raise
        assert code == 0, dep.log_text()[-3000:]


def _send_raw_tls(dep: Deployment, path: Path) -> int | None:
    """The bytes of a file storescu cannot read, over TLS with the client certificate (pynetdicom)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(dep.tls["server_cert"]))
    ctx.load_cert_chain(str(dep.tls["client_cert"]), str(dep.tls["client_key"]))
    return send_as_stored(dep.port, path, ssl_context=ctx)


def test_production_config_serves_over_tls_into_postgres_and_redis(deployment: Deployment) -> None:
    dep = deployment
    assert echoscu(dep.port, extra=dep.tls_opts()).returncode == 0
    assert echoscu(dep.port).returncode != 0  # plain TCP on the TLS port gets nowhere

    statuses: dict[str, int | None] = {}
    plan = []
    for row in dicom_manifest():
        prefix, opts = row["file"][:2], storescu_opts(row)
        if prefix in RAW_SENDS:
            statuses[row["file"]] = _send_raw_tls(dep, dicom_dir() / row["file"])
        elif opts is not None:
            plan.append((tuple(opts + EXTRA_OPTS.get(prefix, [])), row["file"]))
    for opts, group in groupby(sorted(plan), key=lambda p: p[0]):
        files = [dicom_dir() / name for _, name in group]
        result = storescu(dep.port, files, opts=[*opts, *dep.tls_opts()])
        for f in files:
            statuses[f.name] = result.responses.get(sop_instance_uid(f))
    for row in dicom_manifest():
        if row["expect"] == "accept" and row["file"] in statuses and not row["file"].startswith("37"):
            assert statuses[row["file"]] == 0x0000, row["file"]

    store = AuditStore.open(dep.env["CXRNODE_DATABASE__URL"])
    try:
        assert store.engine.dialect.name == "postgresql"
        accepted = [s for s in statuses.values() if s == 0x0000]
        live = [i for i in store.list_instances() if i.state not in (InstanceState.REJECTED, InstanceState.DUPLICATE)]
        assert len(live) == len(accepted)
        queued = [i for i in live if i.state == InstanceState.QUEUED]
        assert queued, "chest frontal images are routed to analysis"
        assert all(a.tls for a in store.list_associations() if a.result != "rejected")
        # No GPU worker runs here: every hand-off waits in Redis, none lost.
        wait_for(
            lambda: queue_depth(dep.env["CXRNODE_BROKER__URL"], "inference") == len(queued),
            30,
            "the hand-offs to reach Redis",
        )

        # The console on the same configuration reports the deployment's state.
        for key, value in dep.env.items():
            os.environ[key] = value
        try:
            settings = load_settings(PRODUCTION)
        finally:
            for key in dep.env:
                os.environ.pop(key, None)
        assert settings.web.production and settings.dicom.tls.enabled
        web = start_in_thread(settings, store, port=0)
        try:
            # The checks' details are for console users only. The production console sits behind a TLS
            # proxy on this host (web.behind_tls_proxy): its session cookie is Secure, so this plain-HTTP
            # client sends it by hand, as the proxy would.
            login = httpx.post(
                f"{web.url}/login",
                data={"username": ADMIN, "password": PASSWORD},
                headers={"X-Forwarded-Proto": "https"},
                timeout=30,
            )
            assert login.status_code == 303 and "secure" in login.headers["set-cookie"].lower()
            session = login.headers["set-cookie"].split(";", 1)[0]
            ready = httpx.get(f"{web.url}/readyz", headers={"Cookie": session}, timeout=30)
            body = ready.json()
            assert ready.status_code == 200, body
            assert body["checks"]["database"]["detail"] == "postgresql reachable"
            assert body["checks"]["broker"]["ok"] and "redis://" in body["checks"]["broker"]["detail"]
            # The node's own consumer of the `node` queue answers Celery pings but is not a worker.
            assert body["checks"]["workers"] == {
                **body["checks"]["workers"],
                "ok": False,
                "critical": False,
                "detail": "no worker consumes queue 'inference'",
            }
            metrics = httpx.get(f"{web.url}/metrics", timeout=30).text
            assert f'cxrnode_instances_in_state{{state="queued"}} {float(len(queued))}' in metrics
            assert f"cxrnode_queue_depth {float(len(queued))}" in metrics
        finally:
            web.stop()
    finally:
        store.close()


def test_readiness_finds_a_real_worker_on_the_inference_queue(redis_server: RedisServer) -> None:
    """A Celery worker consuming `inference` (a minimal app: no models) is found; one on another queue is not."""
    import sys

    from node.runtime.health import check_workers

    broker = redis_server.url.rsplit("/", 1)[0] + "/7"  # a database of its own: no other test's messages
    env = {**os.environ, "CXRNODE_PROBE_BROKER": broker}
    celery = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tests.support.probe_worker",
        "worker",
        "--pool",
        "solo",
        "--without-heartbeat",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "WARNING",
    ]
    other = subprocess.Popen(
        [*celery, "-Q", "node", "-n", "nodeq@%h"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    worker = subprocess.Popen(
        [*celery, "-Q", "inference", "-n", "gpu0@%h"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: check_workers(broker, timeout=1.0).ok, 60, "the inference worker to answer")
        wait_for(lambda: check_workers(broker, timeout=1.0, queue="node").ok, 60, "the node-queue worker to answer")
        result = check_workers(broker, timeout=1.0)
        assert [name.split("@")[0] for name in result.data["workers"]] == ["gpu0"], result.detail
    finally:
        for proc in (worker, other):
            proc.send_signal(signal.SIGTERM)
        for proc in (worker, other):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.postgres
def test_compose_database_settings_take_any_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17, finding 10: compose's URL carries no password; libpq's PGPASSWORD does, whatever it holds."""
    import psycopg
    import yaml

    password = "p@ss/w:rd%#?"
    server = PostgresServer(host_auth="scram-sha-256").start()
    try:
        with psycopg.connect(
            host=str(server.root), port=server.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(psycopg.sql.SQL("CREATE ROLE cxrnode LOGIN PASSWORD {}").format(psycopg.sql.Literal(password)))
            conn.execute("CREATE DATABASE cxrnode OWNER cxrnode")
        env = yaml.safe_load((REPO_ROOT / "deploy" / "compose.yaml").read_text())["x-node-env"]
        url = env["CXRNODE_DATABASE__URL"].replace("@postgres:5432/", f"@127.0.0.1:{server.port}/")
        assert env["PGPASSWORD"].startswith("${POSTGRES_PASSWORD")
        monkeypatch.setenv("PGPASSWORD", password)
        store = AuditStore.open(url)  # migrates: a real login with the password
        assert store.list_ae() == []
        store.close()
        monkeypatch.setenv("PGPASSWORD", "wrong")
        with pytest.raises(Exception, match="password authentication failed"):
            AuditStore.open(url)
    finally:
        server.stop()
