"""The triage worklist as the console, /metrics and `cxrnode triage list` / `alerts` show it (real HTTP,
real CLI process, one audit database filled as the node fills it)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from node.audit import AuditStore
from node.audit.models import AlertState
from node.runtime.config import Settings, load_settings
from node.triage.engine import TriageEngine
from node.web.server import start_in_thread
from tests.integration.test_triage import HOOK, RIS, figures, receive
from tests.support.console import PASSWORD_HASH, USERS, VIEWER, VIEWER_PASSWORD, ConsoleClient
from tests.support.node import cxrnode_command


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(
        None,
        storage={"data_dir": str(tmp_path / "var")},
        database={"url": f"sqlite:///{tmp_path / 'audit.db'}"},
        web={"password_hash": PASSWORD_HASH, "users": USERS},
        triage={
            "stable_s": 0,
            "allow_experimental": True,
            "destinations": [HOOK, RIS],
            "routes": {"critical": ["ris", "hook"], "urgent": ["ris"]},
        },
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[AuditStore]:
    s = AuditStore.open(settings.database_url)
    yield s
    s.close()


@pytest.fixture
def studies(store: AuditStore, settings: Settings) -> dict[str, str]:
    """Three decided studies, one per level; the critical one's HL7 alert is dead."""
    uids = {"critical": generate_uid(), "urgent": generate_uid(), "routine": generate_uid()}
    receive(store, settings, study_uid=uids["urgent"], patient_id="P1", detail=figures(5, 0.1))
    receive(store, settings, study_uid=uids["critical"], patient_id="P2", detail=figures(1, 0.95))
    receive(store, settings, study_uid=uids["routine"], patient_id="P3", detail=figures(0, 0.05))
    TriageEngine(settings, store).run_once()
    dead = next(a for a in store.list_alerts() if a.level == "critical" and a.kind == "hl7")
    store.record_alert_attempt(dead.id, ok=False, error="AR: unknown patient", give_up=True)
    return uids


def cli(settings: Settings, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "cxrnode.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{settings.storage.data_dir}"\n[database]\nurl = "{settings.database_url}"\n'
    )
    return subprocess.run(
        [*cxrnode_command(), *args, "--config", str(config)], capture_output=True, text=True, timeout=60
    )


def test_cli_lists_by_level_and_retries_dead_alerts(
    settings: Settings, store: AuditStore, studies: dict[str, str], tmp_path: Path
) -> None:
    out = cli(settings, tmp_path, "triage", "list", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["level"] for r in rows] == ["critical", "urgent", "routine"]
    assert rows[0]["study_uid"] == studies["critical"] and rows[0]["triggered_by"] == "pneumothorax"
    only = json.loads(cli(settings, tmp_path, "triage", "list", "--json", "--level", "urgent").stdout)
    assert [r["study_uid"] for r in only] == [studies["urgent"]]
    dead = json.loads(cli(settings, tmp_path, "alerts", "list", "--json", "--state", "dead").stdout)
    assert [(a["destination"], a["last_error"]) for a in dead] == [("ris", "AR: unknown patient")]
    retried = cli(settings, tmp_path, "alerts", "retry", "--all-dead")
    assert retried.returncode == 0 and "1 alert(s) due again" in retried.stdout
    assert store.list_alerts(state=AlertState.DEAD) == []
    assert cli(settings, tmp_path, "alerts", "retry", "--all-dead").returncode == 1


def test_console_worklist_filters_and_retry(settings: Settings, store: AuditStore, studies: dict[str, str]) -> None:
    web = start_in_thread(settings, store, port=0)
    client = ConsoleClient(web.url)
    try:
        client.login()
        page = client.get("/worklist").text
        assert page.index(studies["critical"]) < page.index(studies["urgent"]) < page.index(studies["routine"])
        assert "AR: unknown patient" in page and "pneumothorax probability 0.95" in page
        urgent = client.get("/worklist", level="urgent").text
        assert studies["urgent"] in urgent and studies["critical"] not in urgent
        dead_only = client.get("/worklist", alerts="dead").text
        assert studies["critical"] in dead_only and studies["urgent"] not in dead_only
        metrics = client.get("/metrics").text
        for level in ("critical", "urgent", "routine"):
            assert f'cxrnode_triage_studies{{level="{level}"}} 1.0' in metrics
        critical = next(r.study.id for r in store.list_triage() if r.study.study_instance_uid == studies["critical"])
        study_page = client.get(f"/studies/{critical}").text
        assert 'class="level critical"' in study_page and "AR: unknown patient" in study_page
        dead = store.list_alerts(state=AlertState.DEAD)[0]
        viewer = ConsoleClient(web.url)
        viewer.login(VIEWER, VIEWER_PASSWORD)
        assert viewer.post(f"/alerts/{dead.id}/retry").status_code == 403
        viewer.close()
        assert client.post(f"/alerts/{dead.id}/retry").status_code == 303
        assert store.list_alerts(state=AlertState.DEAD) == []
    finally:
        client.close()
        web.stop()


def test_study_page_shows_the_patients_severity_trend(settings: Settings, store: AuditStore) -> None:
    uids = [generate_uid() for _ in range(3)]
    engine = TriageEngine(settings, store)
    for uid, date, severity in zip(uids, ("20261101", "20261115", "20261201"), (1, 2, 5), strict=True):
        receive(store, settings, study_uid=uid, patient_id="TREND", study_date=date, detail=figures(severity, 0.1))
        engine.run_once()
    last = store.get_study(uids[-1])
    assert last is not None
    web = start_in_thread(settings, store, port=0)
    client = ConsoleClient(web.url)
    try:
        client.login()
        page = client.get(f"/studies/{last.id}").text
        trend = page[page.index('id="trend"') :]
        assert [trend.index(u) for u in uids] == sorted(trend.index(u) for u in uids)  # oldest first
        assert "1/6" in trend and "2/6" in trend and "5/6" in trend
        assert "severity change +3" in page
    finally:
        client.close()
        web.stop()
