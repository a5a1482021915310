"""Two nodes on one audit database: each row names its node, and each node acts only on its own rows.

The e2e test (tests/e2e/test_two_nodes.py) shows the whole behaviour with HAProxy and a killed node;
these are the store-level rules it rests on, on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update

from node.audit import AuditStore, InstanceFilter, InstanceState, NewExport, ReceivedInstance
from node.audit.models import Event, Export, Instance, Study
from node.audit.store import RouteOutcome
from node.audit.triage_store import NewAlert
from node.runtime.config import ConfigError, load_settings
from workers.api import NODE_QUEUE, AnalyzeRequest, node_queue, reply_queue_of

CR = "1.2.840.10008.5.1.4.1.1.1"


@pytest.fixture
def stores(database_url: str) -> Iterator[tuple[AuditStore, AuditStore]]:
    a = AuditStore.open(database_url, node="node-a")
    b = AuditStore.open(database_url, run_migrations=False, node="node-b")
    yield a, b
    a.close()
    b.close()


def receive(store: AuditStore, uid: str, study: str = "1.2.3", spool: str = "") -> Instance:
    info = ReceivedInstance(
        sop_instance_uid=uid,
        sop_class_uid=CR,
        study_instance_uid=study,
        calling_ae="PACS",
        spool_path=spool or f"/spool/{uid}.dcm",
    )
    return store.record_instance_received(
        info, RouteOutcome(InstanceState.QUEUED, rule="r", models=["lung"], destinations=["PACS"])
    )


def analyse(store: AuditStore, inst: Instance) -> None:
    store.record_analysis(
        inst.job_id,
        exports=[NewExport("PACS", "seg", f"/results/{inst.id}/seg.dcm")],
        files={},
        detail={"severity_score": 1},
    )


def test_rows_name_the_node_that_wrote_them_and_queries_keep_to_it(stores: tuple[AuditStore, AuditStore]) -> None:
    a, b = stores
    on_a, on_b = receive(a, "1.1"), receive(b, "1.2")  # one study, an image on each node
    assert (on_a.node, on_b.node) == ("node-a", "node-b")
    study = a.list_studies()[0]
    assert study.study.node == "node-a" and study.nodes == ["node-a", "node-b"]  # first image: a decides it
    assert [i.id for i in a.pending_instances(own=True)] == [on_a.id]
    assert [i.id for i in b.list_instances(InstanceFilter(node=b.node))] == [on_b.id]
    # Results are recorded by whichever process finishes; the export belongs to the image's node.
    analyse(b, b.get_instance(on_a.id))
    analyse(b, b.get_instance(on_b.id))
    assert [e.instance_id for e in a.due_exports(own=True)] == [on_a.id]
    assert [e.instance_id for e in b.due_exports(own=True)] == [on_b.id]
    assert len(a.due_exports()) == 2
    events = a.list_events(kinds=["instance.received"])
    assert {(e.instance_id, e.node) for e in events} == {(on_a.id, "node-a"), (on_b.id, "node-b")}


def test_a_study_is_decided_and_alerted_by_its_owner_only(stores: tuple[AuditStore, AuditStore]) -> None:
    a, b = stores
    inst = receive(a, "2.1", study="2.9")
    receive(b, "2.2", study="2.9")
    for i in a.list_instances():
        analyse(a, i)
    assert a.triage_candidates(stable_s=0, max_age_s=3600, own=True) == [inst.study_id]
    assert b.triage_candidates(stable_s=0, max_age_s=3600, own=True) == []
    assert inst.study_id is not None
    a.record_triage(
        inst.study_id,
        inputs=["x"],
        level="routine",
        reasons=[],
        summary={},
        severity_score=1,
        patient_id="",
        issuer="",
        study_date="",
        alerts=[NewAlert("hook", "webhook", ("routine",))],
        payload=lambda revision, alert_id: {"alert_id": alert_id, "revision": revision},
    )
    assert [al.study_id for al in a.due_alerts(own=True)] == [inst.study_id]
    assert b.due_alerts(own=True) == []
    assert {e.node for e in b.list_events(kinds=["triage.decided", "alert.created"])} == {"node-a"}


def test_rows_from_before_node_names_go_to_the_node_that_holds_their_files(
    stores: tuple[AuditStore, AuditStore], tmp_path: Path
) -> None:
    a, b = stores
    here = tmp_path / "here.dcm"
    here.write_bytes(b"x")
    mine, theirs = receive(a, "3.1", spool=str(here)), receive(a, "3.2")
    analyse(a, mine)
    with a.session() as s:  # as migration 0006 leaves rows written before it
        for table in (Instance, Export, Study, Event):
            s.execute(update(table).values(node=""))
    assert b.adopt_local_rows(lambda p: Path(p).exists()) == 1
    assert b.get_instance(mine.id).node == "node-b" and b.get_instance(theirs.id).node == ""
    assert [e.instance_id for e in b.due_exports(own=True)] == [mine.id]
    assert b.list_studies()[0].study.node == "node-b"
    assert b.adopt_local_rows(lambda p: Path(p).exists()) == 0  # named rows never move


def test_node_name_setting_and_the_reply_queue(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[node]\nname = "cxr-a"\n')
    assert load_settings(cfg).node_name == "cxr-a"
    cfg.write_text('[node]\nname = "two words"\n')
    with pytest.raises(ConfigError, match=r"node\.name"):
        load_settings(cfg)
    cfg.write_text("")
    assert load_settings(cfg).node_name  # the host name
    import numpy as np

    request = AnalyzeRequest.build("1.2", np.zeros((4, 4), np.uint8), ("lung",), reply_queue=node_queue("cxr-a"))
    assert AnalyzeRequest.from_message(request.to_message()).reply_queue == "node.cxr-a"
    old = {k: v for k, v in request.to_message().items() if k != "reply_queue"}
    assert AnalyzeRequest.from_message(old).reply_queue == NODE_QUEUE  # a message from an older node
    assert reply_queue_of({"reply_queue": "inference"}) == NODE_QUEUE  # never another queue than a node's


def test_the_console_shows_which_node_did_what(stores: tuple[AuditStore, AuditStore], tmp_path: Path) -> None:
    from node.web.server import start_in_thread
    from tests.support.console import ADMIN, PASSWORD_HASH, ConsoleClient

    a, b = stores
    inst = receive(a, "4.1", study="4.9")
    receive(b, "4.2", study="4.9")
    analyse(a, inst)
    settings = load_settings(
        None,
        node={"name": "node-b"},
        storage={"data_dir": tmp_path / "var"},
        web={"host": "127.0.0.1", "admin_user": ADMIN, "password_hash": PASSWORD_HASH},
    )
    web = start_in_thread(settings, b, port=0)
    client = ConsoleClient(web.url)
    try:
        assert client.login().status_code == 303
        studies = client.get("/studies").text
        assert '<td class="node">node-a, node-b</td>' in studies
        assert '<span class="node" title="this console\'s node">node-b</span>' in studies
        study = client.get(f"/studies/{inst.study_id}").text
        assert study.count('<td class="node">node-a</td>') >= 3  # triage owner, the instance, its export
        events = client.get("/events").text
        assert '<td class="node">node-b</td>' in events and '<td class="node">node-a</td>' in events
    finally:
        client.close()
        web.stop()
