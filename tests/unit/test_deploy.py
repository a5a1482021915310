"""deploy/: the compose file, systemd units, Dockerfiles and the production example config are valid.

Docker cannot run here, so compose.yaml is checked against the parts of the Compose specification the
file uses (and every `${VAR}` it references must be documented), instead of `docker compose config`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from node.runtime.config import ConfigError, load_settings
from tests.support.paths import REPO_ROOT
from workers.api import BROKER_ENV, RESULT_BACKEND_ENV

DEPLOY = REPO_ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
PRODUCTION = DEPLOY / "config" / "cxrnode.production.toml"

SERVICE_KEYS = {
    "build",
    "image",
    "restart",
    "command",
    "environment",
    "volumes",
    "ports",
    "depends_on",
    "healthcheck",
    "deploy",
    "stop_grace_period",
    "user",
    "entrypoint",
    "env_file",
    "networks",
}
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "disable"}
DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def compose_problems(data: dict[str, Any], base: Path) -> list[str]:  # noqa: C901 — a flat checklist
    """Schema problems of a compose document (empty list = valid for what this project uses)."""
    problems: list[str] = []
    top_allowed = {"name", "services", "volumes", "networks", "configs", "secrets"}
    for key in data:
        if key not in top_allowed and not key.startswith("x-"):
            problems.append(f"unknown top-level key {key!r}")
    services = data.get("services") or {}
    named_volumes = set((data.get("volumes") or {}).keys())
    for name, svc in services.items():
        where = f"services.{name}"
        if not isinstance(svc, dict):
            problems.append(f"{where} is not a mapping")
            continue
        for key in set(svc) - SERVICE_KEYS:
            problems.append(f"{where}: unknown key {key!r}")
        if "image" not in svc and "build" not in svc:
            problems.append(f"{where}: needs image or build")
        if "build" in svc:
            build = svc["build"]
            context = base / build.get("context", ".")
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"{where}: Dockerfile {dockerfile} missing")
        hc = svc.get("healthcheck")
        if hc is None:
            problems.append(f"{where}: no healthcheck")
        else:
            for key in set(hc) - HEALTHCHECK_KEYS:
                problems.append(f"{where}.healthcheck: unknown key {key!r}")
            test = hc.get("test")
            if not (isinstance(test, list) and test and test[0] in ("CMD", "CMD-SHELL", "NONE")) and not isinstance(
                test, str
            ):
                problems.append(f"{where}.healthcheck.test must be a string or [CMD|CMD-SHELL, ...]")
            for key in ("interval", "timeout", "start_period"):
                if key in hc and not DURATION.match(str(hc[key])):
                    problems.append(f"{where}.healthcheck.{key}: {hc[key]!r} is not a duration")
        for dep, cond in (svc.get("depends_on") or {}).items():
            if dep not in services:
                problems.append(f"{where}.depends_on: unknown service {dep!r}")
            if isinstance(cond, dict) and cond.get("condition") not in (
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            ):
                problems.append(f"{where}.depends_on.{dep}: bad condition {cond.get('condition')!r}")
        for vol in svc.get("volumes") or []:
            source = str(vol).split(":")[0]
            if source.startswith((".", "/")):
                if not (base / source).exists():
                    problems.append(f"{where}.volumes: bind source {source} does not exist")
            elif source not in named_volumes:
                problems.append(f"{where}.volumes: named volume {source!r} not declared at top level")
        for port in svc.get("ports") or []:
            if not re.match(r"^(\d+:)?\d+(/(tcp|udp))?$", str(port)):
                problems.append(f"{where}.ports: bad mapping {port!r}")
        env = svc.get("environment") or {}
        if not isinstance(env, dict):
            problems.append(f"{where}.environment: use a mapping")
        for key, value in env.items():
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                problems.append(f"{where}.environment: bad variable name {key!r}")
            if not isinstance(value, str):
                problems.append(f"{where}.environment.{key}: quote the value (YAML {type(value).__name__})")
        devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
        for dev in devices or []:
            if "capabilities" not in dev:
                problems.append(f"{where}: device reservation without capabilities")
    return problems


def test_compose_file_is_valid() -> None:
    assert compose_problems(_compose(), DEPLOY) == []


def test_compose_has_the_whole_stack_with_health_checks_and_volumes() -> None:
    data = _compose()
    services = data["services"]
    assert set(services) == {"node", "worker", "redis", "postgres", "orthanc"}
    assert services["node"]["build"]["dockerfile"] == "deploy/Dockerfile.node"
    assert services["worker"]["build"]["dockerfile"] == "deploy/Dockerfile.worker"
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert any(str(v).startswith("spool:/var/lib/cxrnode") for v in services["node"]["volumes"])
    assert any(str(v).startswith("pgdata:") for v in services["postgres"]["volumes"])
    assert services["node"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }
    # The node's environment points at the compose services, and the worker reads the same broker
    # under the names workers.tasks looks up.
    env = services["node"]["environment"]
    worker_env = services["worker"]["environment"]
    assert env["CXRNODE_BROKER__URL"] == worker_env[BROKER_ENV] == "redis://redis:6379/0"
    assert env["CXRNODE_BROKER__RESULT_BACKEND"] == worker_env[RESULT_BACKEND_ENV]
    assert "@postgres:5432/" in env["CXRNODE_DATABASE__URL"]
    # Any password works: it is libpq's PGPASSWORD, never pasted into the URL (issue 17, finding 10).
    assert env["CXRNODE_DATABASE__URL"] == "postgresql+psycopg://cxrnode@postgres:5432/cxrnode"
    assert "POSTGRES_PASSWORD" in env["PGPASSWORD"]


def test_compose_secrets_come_from_the_environment_and_are_documented() -> None:
    text = COMPOSE.read_text()
    refs = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)(?::?[-?][^}]*)?\}", text))
    assert refs == {"POSTGRES_PASSWORD", "CXRNODE_WEB_PASSWORD_HASH"}
    header = "".join(line for line in text.splitlines(True) if line.startswith("#"))
    for ref in refs:
        assert ref in header, f"{ref} is used but the header does not say how to set it"
        assert re.search(r"\$\{" + ref + r":\?", text), f"{ref} must be required (${{{ref}:?...}})"


def test_compose_node_environment_is_accepted_by_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = dict(_compose()["services"]["node"]["environment"])
    values = {"POSTGRES_PASSWORD": "p@ss/w:rd", "CXRNODE_WEB_PASSWORD_HASH": "pbkdf2_sha256$1000$c2FsdA$aGFzaA"}
    for key, value in env.items():
        resolved = re.sub(r"\$\{([A-Z_]+)[^}]*\}", lambda m: values[m.group(1)], value)
        monkeypatch.setenv(key, resolved)
    settings = load_settings(PRODUCTION)
    assert settings.broker.url == "redis://redis:6379/0"
    assert settings.database.url == "postgresql+psycopg://cxrnode@postgres:5432/cxrnode"
    assert os.environ["PGPASSWORD"] == "p@ss/w:rd"  # for libpq, whatever characters it holds
    assert settings.dicom.tls.enabled is False  # the override merges into [dicom.tls], keeping the rest
    assert settings.dicom.tls.cert_file == Path("/etc/cxrnode/tls/node.crt")
    assert [a.name for a in settings.ae] == ["ORTHANC"]
    assert settings.web.password_hash == values["CXRNODE_WEB_PASSWORD_HASH"]


def test_production_config_loads_and_is_production() -> None:
    s = load_settings(PRODUCTION)
    assert s.web.production and s.web.password_hash.startswith("pbkdf2_sha256$")
    assert s.database_url.startswith("postgresql+psycopg://")
    assert s.broker_url.startswith("redis://") and not s.embedded and not s.broker.embedded_worker
    assert s.dicom.tls.enabled and s.dicom.tls.require_client_cert
    assert [r.name for r in s.rules] == ["chest-frontal", "secondary-capture-chest", "everything-else"]


def test_production_config_with_a_typo_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(PRODUCTION.read_text().replace("min_free_mb", "min_free_mbytes"))
    with pytest.raises(ConfigError, match=r"storage\.min_free_mbytes: unknown key"):
        load_settings(bad)


def test_node_image_is_slim_non_root_and_torch_free() -> None:
    text = (DEPLOY / "Dockerfile.node").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert re.search(r"pip install \.\s", text) and not re.search(r"pip install [\"']?\.\[", text)
    assert "find_spec('torch')" in text  # the build fails if torch slipped in
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and not users[-1].startswith(("root", "0"))
    assert "HEALTHCHECK" in text and "/healthz" in text


def test_worker_image_installs_the_worker_extra_and_consumes_inference() -> None:
    text = (DEPLOY / "Dockerfile.worker").read_text()
    assert 'pip install ".[worker]"' in text
    cmd = re.search(r"^CMD \[(.*?)\]\s*$", text.replace("\\\n", " "), re.M)
    assert cmd is not None
    args = [a.strip().strip('"') for a in cmd.group(1).split(",")]
    assert args[:5] == ["celery", "-A", "workers.tasks", "worker", "-Q"] and args[5] == "inference"
    assert "--prefetch-multiplier" in args and args[args.index("--prefetch-multiplier") + 1] == "1"
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and not users[-1].startswith(("root", "0"))


def _units(tmp_path: Path) -> list[Path]:
    """The units with /opt/cxrnode/bin pointed at this venv, so that verify finds the executables."""
    out = []
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        text = unit.read_text().replace("/opt/cxrnode/bin/", f"{Path(sys.executable).parent}/")
        name = unit.name.replace("@.service", "@0.service")
        (tmp_path / name).write_text(text)
        out.append(tmp_path / name)
    return out


def test_systemd_units_verify(tmp_path: Path) -> None:
    units = _units(tmp_path)
    assert [u.name for u in units] == ["cxrnode-worker@0.service", "cxrnode.service"]
    for unit in units:
        assert re.search(
            r"^ExecStart=\S+/(cxrnode serve|celery -A workers.tasks worker -Q inference)", unit.read_text(), re.M
        ), unit.name
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (parser checks above still ran)")
    proc = subprocess.run([analyze, "verify", *map(str, units)], capture_output=True, text=True, timeout=60)
    # Only problems with our units count (verify also reports on unrelated host units).
    ours = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if any(u.name in line for u in units) or "cxrnode" in line
    ]
    assert ours == [], "\n".join(ours)


def test_systemd_units_are_well_formed() -> None:
    for unit in (DEPLOY / "systemd").glob("*.service"):
        sections: dict[str, dict[str, str]] = {}
        current = None
        for raw in unit.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if m := re.match(r"^\[(\w+)\]$", line):
                current = m.group(1)
                sections[current] = {}
                continue
            assert current is not None and "=" in line, f"{unit.name}: {raw!r}"
            key, value = line.split("=", 1)
            sections[current][key] = value
        assert set(sections) == {"Unit", "Service", "Install"}, unit.name
        svc = sections["Service"]
        assert svc["User"] == "cxrnode" and svc["NoNewPrivileges"] == "yes" and svc["Restart"] == "on-failure"
        assert svc["KillSignal"] == "SIGTERM"
        assert sections["Install"]["WantedBy"] == "multi-user.target"


def test_worker_unit_points_at_the_production_broker() -> None:
    unit = (DEPLOY / "systemd" / "cxrnode-worker@.service").read_text()
    broker = re.search(rf"^Environment={BROKER_ENV}=(\S+)$", unit, re.M)
    assert broker is not None and broker.group(1) == load_settings(PRODUCTION).broker.url


def test_shipped_haproxy_config_is_valid_and_balances_two_nodes_on_the_dicom_port() -> None:
    """deploy/haproxy/haproxy.cfg as shipped: HAProxy accepts it, TCP mode, two checked servers on 11112."""
    if shutil.which("haproxy") is None:
        pytest.fail("haproxy not installed: `make sysdeps` (it is in the Makefile's DEBS)")
    cfg = REPO_ROOT / "deploy" / "haproxy" / "haproxy.cfg"
    check = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    text = cfg.read_text()
    assert re.search(r"^\s*mode tcp$", text, re.M) and re.search(r"^\s*bind :11112$", text, re.M)
    servers = re.findall(r"^\s*server (\S+) \S+:11112$", text, re.M)
    assert servers == ["node-a", "node-b"]
    assert re.search(
        r"^\s*default-server check .*on-marked-down shutdown-sessions send-proxy-v2 check-send-proxy", text, re.M
    )
