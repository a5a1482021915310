"""The admin console over real HTTP on a real audit log filled by `cxrnode serve` from every test file.

The node receives the whole DICOM test set from DCMTK storescu, then stops; the console (in this
process, as `cxrnode serve` runs it) works on the same database. Result objects for one instance are
real SEG and SR files built by node.results; C-ECHO goes to a real DCMTK storescp.
"""

from __future__ import annotations

import io
import re
import stat
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from node.audit.models import ExportState, Instance, InstanceState
from node.audit.store import InstanceFilter, ReceivedInstance
from node.results.common import DeviceInfo
from node.results.seg import build_seg
from node.results.sr import build_sr
from node.web.app import create_app
from node.web.auth import AuthConfigError
from node.web.server import start_console, start_in_thread
from tests.support.console import (
    ADMIN,
    OPS,
    OPS_PASSWORD,
    PASSWORD,
    VIEWER,
    VIEWER_PASSWORD,
    ConsoleClient,
    ConsoleSite,
    console_site,
    web_toml,
)
from tests.support.dcmtk import StoreSCP
from tests.support.net import free_port, wait_for
from tests.support.node import NodeProcess, cxrnode_command
from tests.support.paths import dicom_manifest
from tests.support.synthetic_results import synthetic_case
from tests.support.tls import self_signed

pytestmark = pytest.mark.timeout(300)

ACTOR = f"web:{ADMIN}"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleSite]:
    with console_site(tmp_path_factory.mktemp("console")) as s:
        yield s


@pytest.fixture
def client(site: ConsoleSite) -> Iterator[ConsoleClient]:
    c = ConsoleClient(site.web.url)
    assert c.login().status_code == 303
    yield c
    c.close()


def _stored(site: ConsoleSite) -> list[Instance]:
    return [i for i in site.store.list_instances() if i.state not in (InstanceState.REJECTED, InstanceState.DUPLICATE)]


def test_pages_need_a_login_and_failed_logins_are_audited(site: ConsoleSite) -> None:
    anon = ConsoleClient(site.web.url)
    for path in ("/", "/studies", "/ae", "/rules", "/models", "/dead", "/events", "/studies/1"):
        r = anon.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next="), path
    assert anon.http.post("/ae", data={"name": "EVIL", "csrf": "x"}).headers["location"].startswith("/login")
    assert site.store.get_ae("EVIL") is None
    bad = anon.login(password="wrong")
    assert bad.status_code == 401 and "Wrong user name or password" in bad.text
    assert site.store.list_events(kinds=["web.login_failed"])[-1].actor == ACTOR
    ok = anon.http.post(
        "/login", data={"username": ADMIN, "password": "console-test-password", "next": "//evil.example/"}
    )
    assert ok.status_code == 303 and ok.headers["location"] == "/"  # no open redirect
    assert "HttpOnly" in ok.headers["set-cookie"] and "SameSite=strict" in ok.headers["set-cookie"]
    anon.close()


def test_forged_form_without_csrf_token_changes_nothing(site: ConsoleSite, client: ConsoleClient) -> None:
    r = client.http.post("/ae", data={"name": "FORGED", "role": "both", "csrf": "not-the-token"})
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    assert site.store.get_ae("FORGED") is None


def test_dashboard_counts_what_the_node_received_today(site: ConsoleSite, client: ConsoleClient) -> None:
    page = client.get("/").text
    accepted = [s for s in site.statuses.values() if s == 0x0000]
    received = re.search(r'id="n-received">(\d+)<', page)
    assert received and int(received.group(1)) == len(accepted) == len(_stored(site))
    assert 'id="ready" class="ok">yes' in page
    assert "MB free of" in page and "instance(s) queued" in page


def test_study_search_by_ae_state_accession_and_date(site: ConsoleSite, client: ConsoleClient) -> None:
    studies = {i.study_id for i in _stored(site)}
    listed = re.findall(r'href="/studies/(\d+)"', client.get("/studies").text)
    assert {int(x) for x in listed} == studies
    assert len(re.findall(r'href="/studies/', client.get("/studies", ae="STORESCU").text)) == len(studies)
    assert "No study matches." in client.get("/studies", ae="NOSUCHAE").text

    skipped = {i.study_id for i in site.store.list_instances(InstanceFilter(states=["skipped"]))}
    assert skipped  # the lateral, hand and CT images are stored but not analysed
    by_state = {int(x) for x in re.findall(r'href="/studies/(\d+)"', client.get("/studies", state="skipped").text)}
    assert by_state == skipped

    with site.store.session() as s:
        from node.audit.models import Study

        study = s.query(Study).filter(Study.accession_number != "").first()
        assert study is not None
        accession, study_id = study.accession_number, study.id
    hits = re.findall(r'href="/studies/(\d+)"', client.get("/studies", accession=accession).text)
    assert str(study_id) in hits
    today = datetime.now(UTC).date()
    assert len(re.findall(r'href="/studies/', client.get("/studies", date_from=str(today)).text)) == len(studies)
    old = str(today - timedelta(days=400))
    assert "No study matches." in client.get("/studies", date_from=old, date_to=old).text
    assert "Dates are YYYY-MM-DD" in client.get("/studies", date_from="yesterday").text


@pytest.fixture(scope="module")
def analysed(site: ConsoleSite) -> int:
    """Real SEG + SR for the first CR of the test set, registered as exports (SEG sent, SR dead)."""
    first = dicom_manifest()[0]["file"]
    from tests.support.console import sop_instance_uid
    from tests.support.paths import dicom_dir

    inst = site.store.find_live_instance(sop_instance_uid(dicom_dir() / first))
    assert inst is not None and Path(inst.spool_path).exists()
    case = synthetic_case(Path(inst.spool_path))
    seg = build_seg(case.source, case.full, case.result.models, device=DeviceInfo())
    sr = build_sr(
        case.source, seg, case.result, pixel_spacing_mm=case.prepared.prepared_pixel_spacing_mm, device=DeviceInfo()
    )
    out = site.settings.storage.results_dir / str(inst.id)
    out.mkdir(parents=True, exist_ok=True)
    seg.save_as(out / "seg.dcm")
    sr.save_as(out / "sr.dcm")
    e_seg = site.store.create_export(inst.id, destination_ae="STORESCU", kind="seg", file_path=str(out / "seg.dcm"))
    e_sr = site.store.create_export(inst.id, destination_ae="STORESCU", kind="sr", file_path=str(out / "sr.dcm"))
    site.store.record_export_attempt(e_seg.id, status=0, succeeded=True)
    site.store.record_export_attempt(e_sr.id, status=None, error="connection refused", succeeded=False, give_up=True)
    return inst.id


def test_study_page_shows_timeline_severity_measurements_and_overlay(
    site: ConsoleSite, client: ConsoleClient, analysed: int
) -> None:
    inst = site.store.get_instance(analysed)
    page = client.get(f"/studies/{inst.study_id}").text
    assert re.search(rf'id="severity-{analysed}">2<', page)  # the SR's severity score
    assert "Right lung" in page and "Pneumothorax" in page  # legend from the SEG's segments
    # SR items with their finding site: opacity extent and whether the zone counted, per zone.
    assert "Extent (Lower zone of lung, Right)" in page and "Opacity (Lower zone of lung, Right)" in page
    assert "instance.received" in page and "export.dead" in page  # timeline from the audit log
    assert "connection refused" in page

    png = client.get(f"/instances/{analysed}/overlay.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    rgb = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB")).astype(int)
    assert max(rgb.shape[:2]) == 384
    coloured = (np.abs(rgb[..., 0] - rgb[..., 1]) > 20) | (np.abs(rgb[..., 1] - rgb[..., 2]) > 20)
    # The synthetic lungs cover ~28 % of the image: the overlay must colour about that much.
    assert 0.1 < coloured.mean() < 0.6

    other = next(i for i in _stored(site) if i.id != analysed and i.state == InstanceState.QUEUED)
    plain = np.asarray(Image.open(io.BytesIO(client.get(f"/instances/{other.id}/overlay.png").content)).convert("RGB"))
    assert (plain[..., 0] == plain[..., 1]).all()  # no SEG: the grey image only
    assert client.get("/instances/999999/overlay.png").status_code == 404


def test_dead_letter_retry_resend_and_rerun_are_audited(
    site: ConsoleSite, client: ConsoleClient, analysed: int
) -> None:
    page = client.get("/dead").text
    dead = site.store.list_exports(analysed, state=ExportState.DEAD)
    assert len(dead) == 1 and f"/exports/{dead[0].id}/retry" in page
    r = client.post(f"/exports/{dead[0].id}/retry")
    assert "will+be+sent+again" in r.headers["location"]
    assert site.store.list_exports(analysed, state=ExportState.DEAD) == []
    retried = site.store.list_events(kinds=["export.requeued"])[-1]
    assert retried.actor == ACTOR and retried.detail["export_id"] == dead[0].id
    assert "not+in+the+dead-letter+queue" in client.post(f"/exports/{dead[0].id}/retry").headers["location"]

    r = client.post(f"/instances/{analysed}/resend", back="/studies")
    assert "result+object" in r.headers["location"]
    assert {e.state for e in site.store.list_exports(analysed)} == {ExportState.PENDING}
    assert site.store.list_events(kinds=["export.resend"])[-1].actor == ACTOR

    skipped = site.store.list_instances(InstanceFilter(states=["skipped"]))[0]
    r = client.post(f"/instances/{skipped.id}/rerun", back=f"/studies/{skipped.study_id}")
    assert r.headers["location"].startswith(f"/studies/{skipped.study_id}?msg=")
    assert site.store.get_instance(skipped.id).state == InstanceState.QUEUED
    assert site.handed_off[-1] == skipped.id
    event = site.store.list_events(instance_id=skipped.id, kinds=["instance.queued"])[-1]
    assert event.actor == ACTOR and event.detail["from"] == "skipped"

    rejected = site.store.list_instances(InstanceFilter(states=["rejected"]))[0]
    r = client.post(f"/instances/{rejected.id}/rerun")
    assert "err=" in r.headers["location"] and "not+allowed" in r.headers["location"]


def test_ae_titles_add_edit_remove_are_audited_with_the_user(site: ConsoleSite, client: ConsoleClient) -> None:
    r = client.post("/ae", name="MODALITY1", role="source", host="10.1.2.3", port="", description="DR room 1")
    assert r.headers["location"] == "/ae?msg=AE+title+MODALITY1+added"
    assert "MODALITY1" in client.get("/ae").text
    added = site.store.list_events(kinds=["ae.added"])[-1]
    assert added.actor == ACTOR and added.detail["name"] == "MODALITY1"

    r = client.post("/ae/MODALITY1", role="both", host="10.1.2.4", port="104", description="DR room 1", tls="on")
    assert "updated" in r.headers["location"]
    ae = site.store.get_ae("MODALITY1")
    assert ae is not None and (ae.host, ae.port, ae.role, ae.tls) == ("10.1.2.4", 104, "both", True)
    updated = site.store.list_events(kinds=["ae.updated"])[-1]
    assert (
        updated.actor == ACTOR and updated.detail["before"]["port"] is None and updated.detail["after"]["port"] == 104
    )

    for form, message in [
        ({"name": "WAY_TOO_LONG_AE_TITLE"}, "maximum is 16"),
        ({"name": "BAD\\AE"}, "default repertoire"),
        ({"name": "MODALITY1"}, "already exists"),
        ({"name": "PORTLESS", "port": "70000"}, "port"),
        ({"name": "PORTLESS", "port": "abc"}, "not a number"),
    ]:
        r = client.post("/ae", role="both", **form)
        assert r.headers["location"].startswith("/ae?err="), form
        assert message.replace(" ", "+") in r.headers["location"] or message in r.headers["location"], r.headers
    assert site.store.get_ae("PORTLESS") is None

    assert "removed" in client.post("/ae/MODALITY1/remove").headers["location"]
    assert site.store.get_ae("MODALITY1") is None
    assert site.store.list_events(kinds=["ae.removed"])[-1].actor == ACTOR


def test_storage_commitment_switch_and_committed_results(site: ConsoleSite, client: ConsoleClient) -> None:
    r = client.post(
        "/ae", name="COMMITPACS", role="destination", host="127.0.0.1", port="11112", storage_commitment="on"
    )
    assert r.headers["location"] == "/ae?msg=AE+title+COMMITPACS+added"
    row = re.search(r'<tr id="ae-COMMITPACS">(.*?)</tr>', client.get("/ae").text, re.S)
    assert row and "<td>yes</td><td></td>" in row.group(1)  # commitment on, no description
    [added] = [e for e in site.store.list_events(kinds=["ae.added"]) if e.detail["name"] == "COMMITPACS"]
    assert added.detail["storage_commitment"] is True and added.actor == "web:admin"
    r = client.post("/ae", name="SRCONLY", role="source", host="10.0.0.1", port="", storage_commitment="on")
    assert r.headers["location"].startswith("/ae?err=storage_commitment+of+AE")
    assert site.store.get_ae("SRCONLY") is None

    # One result committed, one stored with its commitment report still awaited.
    inst = site.store.record_instance_received(
        ReceivedInstance(
            sop_instance_uid="2.25.4242", sop_class_uid="1.2.840.10008.5.1.4.1.1.1", study_instance_uid="2.25.4243"
        )
    )
    site.store.set_instance_state(inst.id, InstanceState.QUEUED)
    site.store.set_instance_state(inst.id, InstanceState.ANALYZED)
    exports = [
        site.store.create_export(
            inst.id, destination_ae="COMMITPACS", kind=kind, file_path=f"/r/{kind}.dcm", sop_instance_uid=f"2.25.{n}"
        )
        for n, kind in ((1, "seg"), (2, "sr"))
    ]
    for n, e in enumerate(exports, 1):
        site.store.record_sent_for_commitment(
            [(e.id, 0)],
            transaction_uid=f"2.25.99{n}",
            destination_ae="COMMITPACS",
            references=[{"export_id": e.id, "sop_class_uid": "1.2", "sop_instance_uid": e.sop_instance_uid}],
            deadline_at=datetime.now(UTC) + timedelta(hours=1),
        )
    site.store.record_commitment_report(
        "2.25.991", committed=["2.25.1"], failed={}, via="new association", retry_at=lambda _: None
    )
    page = client.get(f"/studies/{inst.study_id}").text
    assert re.search(r'<span class="state committed"[^>]*>committed</span>', page)
    assert re.search(r'<span class="state committing"[^>]*>committing</span>', page)
    dashboard = client.get("/").text
    assert re.search(r'id="n-committed">1<', dashboard) and re.search(r'id="n-committing">1<', dashboard)


def test_c_echo_from_the_console(site: ConsoleSite, client: ConsoleClient, tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "scp", ae_title="ECHOSCP") as scp:
        client.post("/ae", name="ECHOSCP", role="destination", host="127.0.0.1", port=str(scp.port))
        r = client.post("/ae/ECHOSCP/echo")
        assert r.headers["location"].startswith("/ae?msg=C-ECHO+ECHOSCP%3A+success")
        page = client.get("/ae").text
        assert re.search(r'class="ok">success in \d+ ms', page)
    closed = free_port()
    client.post("/ae", name="GONE", role="destination", host="127.0.0.1", port=str(closed))
    r = client.post("/ae/GONE/echo")
    assert r.headers["location"].startswith("/ae?err=C-ECHO+GONE+failed")
    echoes = site.store.list_events(kinds=["ae.echo"])
    assert [(e.detail["name"], e.detail["ok"], e.actor) for e in echoes[-2:]] == [
        ("ECHOSCP", True, ACTOR),
        ("GONE", False, ACTOR),
    ]
    outbound = [a for a in site.store.list_associations() if a.direction == "outbound"]
    assert {a.called_ae for a in outbound} >= {"ECHOSCP", "GONE"}


def test_rules_models_and_events_pages(site: ConsoleSite, client: ConsoleClient, tmp_path: Path) -> None:
    rules = client.get("/rules").text
    for rule in site.settings.rules:
        assert rule.name in rules
    assert "<code>CR</code>" in rules and "rejected" in rules  # unknown calling AE titles
    assert "patient age ≥ 18.0 years (or unknown)" in rules  # the built-in rules' age bound

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "lung.json").write_text(
        '{"name": "lung", "version": "1.2.0", "experimental": false, "metrics": {"dsc": 0.95}, "sha256": "ab12"}'
    )
    (weights / "lung.safetensors").write_bytes(b"\0" * 2_000_000)
    (weights / "broken.json").write_text("{not json")
    app = create_app(site.settings, site.store, weights_dir=weights)
    from starlette.testclient import TestClient

    with TestClient(app, follow_redirects=False) as tc:
        tc.post("/login", data={"username": ADMIN, "password": "console-test-password"})
        page = tc.get("/models").text
    assert "version 1.2.0" in page and "2.0 MB" in page and "dsc" in page
    assert "unreadable card" in page

    events = client.get("/events", kind="ae.").text
    assert "ae.added" in events and "instance.received" not in events


def test_metrics_health_and_readiness(site: ConsoleSite, client: ConsoleClient) -> None:
    assert client.http.get("/healthz").json() == {"status": "ok"}
    ready = client.http.get("/readyz")
    body = ready.json()
    assert ready.status_code == 200 and body["ready"] is True
    assert {k: v["ok"] for k, v in body["checks"].items() if v["critical"]} == {
        "database": True,
        "broker": True,
        "spool": True,
    }
    assert body["checks"]["workers"]["critical"] is False

    text = client.http.get("/metrics").text
    gauges = {
        s.labels["state"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "cxrnode_instances_in_state"
    }
    counts: dict[str, int] = {}
    for inst in site.store.list_instances():
        counts[inst.state] = counts.get(inst.state, 0) + 1
    assert gauges == counts
    events = {
        s.labels["kind"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "cxrnode_audit_events_total"
    }
    assert events["instance.received"] == len(_stored(site))
    assert events["association.accepted"] >= 1 and events["instance.rejected"] >= 1


def test_readiness_fails_below_the_disk_watermark(site: ConsoleSite) -> None:
    from starlette.testclient import TestClient

    full = site.settings.model_copy(update={"storage": site.settings.storage.model_copy(update={"min_free_mb": 10**9})})
    with TestClient(create_app(full, site.store)) as tc:
        anonymous = tc.get("/readyz")
        assert anonymous.status_code == 503 and anonymous.json()["checks"]["spool"] == {
            **anonymous.json()["checks"]["spool"],
            "ok": False,
        }
        assert "detail" not in anonymous.json()["checks"]["spool"]  # what it found: only for a console user
        tc.post("/login", data={"username": ADMIN, "password": PASSWORD}, follow_redirects=False)
        r = tc.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["spool"]["ok"] is False and "below" in r.json()["checks"]["spool"]["detail"]


def test_production_mode_without_any_console_user_refuses_to_start(site: ConsoleSite) -> None:
    prod = site.settings.model_copy(
        update={"web": site.settings.web.model_copy(update={"production": True, "password_hash": "", "users": []})}
    )
    with pytest.raises(AuthConfigError, match="no default password"):
        start_in_thread(prod, site.store, port=0)


def test_start_console_follows_web_enabled(site: ConsoleSite) -> None:
    off = site.settings.model_copy(update={"web": site.settings.web.model_copy(update={"enabled": False})})
    assert start_console(off, site.store) is None
    on = site.settings.model_copy(update={"web": site.settings.web.model_copy(update={"port": free_port()})})
    web = start_console(on, site.store)
    assert web is not None
    try:
        assert web.port == on.web.port
        assert ConsoleClient(web.url).http.get("/healthz").json() == {"status": "ok"}
    finally:
        web.stop()


def test_repeated_failed_logins_lock_the_address_out(site: ConsoleSite) -> None:
    from starlette.testclient import TestClient

    with TestClient(create_app(site.settings, site.store), follow_redirects=False) as tc:
        for _ in range(5):
            assert tc.post("/login", data={"username": ADMIN, "password": "guess"}).status_code == 401
        locked = tc.post("/login", data={"username": ADMIN, "password": "console-test-password"})
        assert locked.status_code == 429 and "Too many failed logins" in locked.text
        assert "set-cookie" not in locked.headers


def test_viewer_sees_every_page_but_each_action_is_refused_and_audited(site: ConsoleSite, analysed: int) -> None:
    viewer = ConsoleClient(site.web.url)
    assert viewer.login(VIEWER, VIEWER_PASSWORD).status_code == 303
    study_id = site.store.get_instance(analysed).study_id
    for path in ("/", "/studies", f"/studies/{study_id}", "/ae", "/rules", "/models", "/dead", "/events"):
        assert viewer.get(path).status_code == 200, path
    assert viewer.get(f"/instances/{analysed}/overlay.png").status_code == 200
    ae_page, study_page = viewer.get("/ae").text, viewer.get(f"/studies/{study_id}").text
    assert "(viewer)" in ae_page and 'id="ae-add"' not in ae_page and 'class="echo"' not in ae_page
    assert 'class="rerun"' not in study_page and 'class="resend"' not in study_page

    def snapshot() -> tuple[object, ...]:
        return (
            [(a.name, a.host, a.port, a.role) for a in site.store.list_ae()],
            [(i.id, i.state) for i in site.store.list_instances()],
            [(e.id, e.state, e.attempts) for e in site.store.list_exports()],
        )

    before, handed_off = snapshot(), len(site.handed_off)
    export_id = site.store.list_exports(analysed)[0].id
    attempts = [
        ("/ae", {"name": "VIEWERAE", "role": "both"}),
        ("/ae/STORESCU", {"role": "both", "host": "10.9.9.9"}),
        ("/ae/STORESCU/remove", {}),
        ("/ae/STORESCU/echo", {}),
        (f"/instances/{analysed}/rerun", {}),
        (f"/instances/{analysed}/resend", {}),
        (f"/exports/{export_id}/retry", {}),
        ("/exports/retry-dead", {}),
    ]
    for path, form in attempts:
        r = viewer.post(path, **form)
        assert r.status_code == 403 and "Not allowed" in r.text, path
    assert snapshot() == before and len(site.handed_off) == handed_off
    denied = site.store.list_events(kinds=["web.denied"])[-len(attempts) :]
    assert [(e.actor, e.detail["path"]) for e in denied] == [(f"web:{VIEWER}", p) for p, _ in attempts]

    assert viewer.post("/logout").headers["location"] == "/login"  # viewers may log out
    assert viewer.get("/studies").status_code == 303
    viewer.close()


def test_an_admin_from_web_users_runs_actions_audited_with_its_name(site: ConsoleSite) -> None:
    ops = ConsoleClient(site.web.url)
    assert ops.login(OPS, OPS_PASSWORD).status_code == 303
    login = site.store.list_events(kinds=["web.login"])[-1]
    assert login.actor == f"web:{OPS}" and login.detail["role"] == "admin"
    r = ops.post("/ae", name="OPSAE", role="source", host="10.0.0.7", port="")
    assert r.headers["location"] == "/ae?msg=AE+title+OPSAE+added"
    assert site.store.list_events(kinds=["ae.added"])[-1].actor == f"web:{OPS}"
    assert "removed" in ops.post("/ae/OPSAE/remove").headers["location"]
    assert site.store.list_events(kinds=["ae.removed"])[-1].actor == f"web:{OPS}"
    ops.close()


def test_sessions_survive_a_node_restart_and_are_shared_by_console_processes(tmp_path: Path) -> None:
    """`cxrnode serve` with the console, restarted; then `cxrnode web` beside it: one cookie works on all."""
    port = free_port()
    node = NodeProcess(tmp_path, extra_toml=web_toml(port))
    standalone: subprocess.Popen[bytes] | None = None
    try:
        node.start()
        user = ConsoleClient(f"http://127.0.0.1:{port}")
        assert user.login(VIEWER, PASSWORD).status_code == 401  # another user's password
        assert user.login("nobody", VIEWER_PASSWORD).status_code == 401
        assert user.login(VIEWER, VIEWER_PASSWORD).status_code == 303
        assert user.get("/studies").status_code == 200

        key_file = node.data_dir / "web-session.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        assert node.stop() == 0
        node.start()
        page = user.get("/studies")
        assert page.status_code == 200 and VIEWER in page.text  # the same cookie, a new process
        assert key_file.read_text().strip() == key and key not in node.log_text()

        other_port = free_port()
        standalone = subprocess.Popen(
            [*cxrnode_command(), "web", "--config", str(node.config), "--port", str(other_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        other = httpx.Client(
            base_url=f"http://127.0.0.1:{other_port}",
            timeout=30,
            follow_redirects=False,
            headers={"Cookie": f"cxrnode_session={user.http.cookies['cxrnode_session']}"},
        )

        def up() -> bool:
            assert standalone is not None and standalone.poll() is None, "cxrnode web exited"
            try:
                return other.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, 60, "cxrnode web")
        assert other.get("/studies").status_code == 200
        other.close()
        user.close()
    finally:
        if standalone is not None:
            standalone.terminate()
            standalone.wait(30)
        node.close()


def test_logout_revokes_the_session_for_whoever_replays_the_cookie(site: ConsoleSite) -> None:
    # Issue 13, finding 6: a copied cookie used to work for the session's 8 hours after logout.
    c = ConsoleClient(site.web.url)
    try:
        assert c.login().status_code == 303
        cookie = c.http.cookies.get("cxrnode_session")
        assert cookie and c.get("/studies").status_code == 200
        assert c.post("/logout").status_code == 303
        replay = httpx.Client(base_url=site.web.url, cookies={"cxrnode_session": cookie}, timeout=30)
        page = replay.get("/studies")
        assert page.status_code == 303 and page.headers["location"].startswith("/login")
        replay.close()
        # Another console process on the same key file sees the revocation too.
        other = create_app(site.settings, site.store)
        with TestClient(other) as tc:
            assert tc.get("/studies", cookies={"cxrnode_session": cookie}, follow_redirects=False).status_code == 303
    finally:
        c.close()


def test_pages_carry_security_headers_and_phi_is_not_cached(site: ConsoleSite, client: ConsoleClient) -> None:
    page = client.get("/studies")
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["cache-control"] == "no-store"
    assert client.http.get("/static/console.css").headers.get("cache-control") != "no-store"
    assert client.http.get("/healthz").headers["x-frame-options"] == "DENY"


def test_redirects_after_forms_stay_on_the_console(site: ConsoleSite, client: ConsoleClient) -> None:
    for target in ("https://evil.example/", "//evil.example/x", "/\\evil.example"):
        r = client.post("/instances/999999/rerun", back=target)
        assert r.status_code == 303 and r.headers["location"].startswith("/studies"), r.headers["location"]
        anon = httpx.Client(base_url=site.web.url, timeout=30)
        r = anon.post("/login", data={"username": ADMIN, "password": PASSWORD, "next": target})
        assert r.headers["location"] == "/"
        anon.close()


def test_failed_logins_are_throttled_per_account_from_any_address(site: ConsoleSite) -> None:
    app = create_app(site.settings, site.store)
    with TestClient(app) as tc:
        for _ in range(5):  # five wrong passwords, each as if from another address
            tc.post("/login", data={"username": VIEWER, "password": "wrong"}, follow_redirects=False)
            app.state.console.throttle._failures.pop("testclient", None)  # as if each came from elsewhere
        r = tc.post("/login", data={"username": VIEWER, "password": VIEWER_PASSWORD}, follow_redirects=False)
        assert r.status_code == 429 and "Too many failed logins" in r.text
        ok = tc.post("/login", data={"username": OPS, "password": OPS_PASSWORD}, follow_redirects=False)
        assert ok.status_code == 303  # other accounts are not locked out


@pytest.mark.parametrize("trusted", [[], ["127.0.0.1"]])
def test_forwarded_headers_are_believed_only_from_configured_proxies(site: ConsoleSite, trusted: list[str]) -> None:
    settings = site.settings.model_copy(
        update={"web": site.settings.web.model_copy(update={"trusted_proxies": trusted})}
    )
    web = start_in_thread(settings, site.store, port=0)
    try:
        before = len(site.store.list_events(kinds=["web.login_failed"]))
        httpx.post(
            f"{web.url}/login",
            data={"username": ADMIN, "password": "wrong"},
            headers={"X-Forwarded-For": "203.0.113.9"},
            timeout=30,
        )
        event = site.store.list_events(kinds=["web.login_failed"])[before]
        assert event.detail["peer"] == ("203.0.113.9" if trusted else "127.0.0.1")
    finally:
        web.stop()


def test_console_over_tls_sets_secure_cookies(site: ConsoleSite, tmp_path: Path) -> None:
    key, cert = self_signed(tmp_path, "console", common_name="127.0.0.1")
    settings = site.settings.model_copy(
        update={
            "web": site.settings.web.model_copy(update={"tls_cert_file": cert, "tls_key_file": key, "production": True})
        }
    )
    web = start_in_thread(settings, site.store, port=0)
    try:
        assert web.url.startswith("https://")
        r = httpx.post(f"{web.url}/login", data={"username": ADMIN, "password": PASSWORD}, verify=str(cert), timeout=30)
        assert r.status_code == 303
        assert "secure" in r.headers["set-cookie"].lower() and "httponly" in r.headers["set-cookie"].lower()
    finally:
        web.stop()


def test_stow_destinations_and_tokens_from_the_console(site: ConsoleSite, client: ConsoleClient) -> None:
    r = client.post(
        "/ae",
        name="WEBPACS",
        role="destination",
        url="https://pacs.example/dicom-web",
        auth="basic",
        username="cxr",
        secret="pw1",
    )
    assert r.headers["location"] == "/ae?msg=AE+title+WEBPACS+added"
    ae = site.store.get_ae("WEBPACS")
    assert ae is not None and (ae.url, ae.auth, ae.username, ae.secret) == (
        "https://pacs.example/dicom-web",
        "basic",
        "cxr",
        "pw1",
    )
    # An edit with the secret left empty keeps it; the page and the audit log never show it.
    client.post(
        "/ae/WEBPACS",
        role="destination",
        url="https://pacs.example/dicom-web",
        auth="basic",
        username="cxr2",
        secret="",
    )
    ae = site.store.get_ae("WEBPACS")
    assert ae is not None and (ae.username, ae.secret) == ("cxr2", "pw1")
    page = client.get("/ae").text
    assert "STOW-RS https://pacs.example/dicom-web" in page and "pw1" not in page
    assert all("pw1" not in str(e.detail) for e in site.store.list_events(kinds=["ae.added", "ae.updated"]))
    r = client.post("/ae", name="HALFWEB", role="destination", url="https://x", auth="basic", secret="p")
    assert r.headers["location"].startswith("/ae?err=") and "username" in r.headers["location"]

    page = client.post("/stow-tokens", source="RIS1", description="the RIS").text
    token = re.search(r'id="new-token">.*<code>(cxrstow_[^<]+)</code>', page)
    assert token is not None
    (row,) = [t for t in site.store.list_stow_tokens() if t.source == "RIS1"]
    assert token.group(1) not in str(row.token_sha256) and row.description == "the RIS"
    assert token.group(1) not in client.get("/ae").text  # shown once
    assert site.store.list_events(kinds=["stow_token.added"])[-1].actor == ACTOR
    assert "revoked" in client.post(f"/stow-tokens/{row.id}/revoke").headers["location"]
    assert all(t.source != "RIS1" for t in site.store.list_stow_tokens())
    assert client.post("/stow-tokens", source="BAD\\SRC").headers["location"].startswith("/ae?err=")
