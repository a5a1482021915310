"""The audit store and `cxrnode audit` on SQLite and PostgreSQL: migrations, state machine, exports, queries."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect

from node.audit import (
    AuditStore,
    DuplicateInstance,
    ExportState,
    InstanceFilter,
    InstanceState,
    ReceivedInstance,
    StoreError,
)
from node.audit.db import migrate
from node.cli.main import main

CR = "1.2.840.10008.5.1.4.1.1.1"


@pytest.fixture
def store(database_url: str) -> Iterator[AuditStore]:
    s = AuditStore.open(database_url)
    yield s
    s.close()


def received(uid: str, study: str = "1.2.3", ae: str = "PACS", association_id: int | None = None) -> ReceivedInstance:
    return ReceivedInstance(
        sop_instance_uid=uid,
        sop_class_uid=CR,
        study_instance_uid=study,
        calling_ae=ae,
        association_id=association_id,
        modality="CR",
        body_part="CHEST",
        view_position="PA",
        accession_number="ACC1",
        spool_path=f"/spool/{uid}.dcm",
    )


def test_migrations_create_every_table_and_are_idempotent(store: AuditStore) -> None:
    migrate(store.engine)  # a second start must not fail
    tables = set(inspect(store.engine).get_table_names())
    assert {
        "associations",
        "studies",
        "instances",
        "events",
        "ae_titles",
        "exports",
        "export_attempts",
        "alembic_version",
    } <= tables


def test_upgrade_from_0001_keeps_rows_and_leaves_their_geometry_empty(database_url: str) -> None:
    from alembic import command
    from sqlalchemy import text

    from node.audit.db import alembic_config, make_engine

    engine = make_engine(database_url)
    cfg = alembic_config(database_url)
    with engine.begin() as conn:  # a database made by the first release
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(
            text(
                "INSERT INTO instances (sop_instance_uid, sop_class_uid, transfer_syntax_uid, "
                "series_instance_uid, calling_ae, modality, body_part, view_position, priority, size_bytes, "
                "state, reason, rule, models, destinations, spool_path, quarantine_path, received_at, "
                "updated_at) VALUES ('9.9', '1.2', '', '', 'PACS', 'CR', '', '', 0, 0, 'queued', '', '', "
                "'[]', '[]', '/spool/9.9.dcm', '', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
    engine.dispose()
    store = AuditStore.open(database_url)  # migrates to head, as every start does
    try:
        (row,) = store.list_instances()
        assert (row.sop_instance_uid, row.state, row.prepared_geometry) == ("9.9", "queued", None)
        assert store.record_job_geometry(row.job_id, {"rows": 1}) and not store.record_job_geometry("1.5", {})
        assert store.get_instance(row.id).prepared_geometry == {"rows": 1, "job_id": row.job_id}
    finally:
        store.close()


def test_instance_state_machine_with_stage_timestamps(store: AuditStore) -> None:
    assoc = store.record_association(
        calling_ae="PACS", called_ae="CXRNODE", peer_host="127.0.0.1", peer_port=5000, result="accepted"
    )
    inst = store.record_instance_received(received("1.1", association_id=assoc))
    assert inst.state == InstanceState.RECEIVED and inst.received_at is not None

    with pytest.raises(StoreError, match="received -> exported is not allowed"):
        store.set_instance_state(inst.id, InstanceState.EXPORTED)
    queued = store.set_instance_state(
        inst.id, "queued", rule="chest-frontal", models=["lung"], destinations=["reply-to-sender"]
    )
    assert queued.queued_at is not None and queued.finished_at is None
    assert store.pending_instances()[0].id == inst.id
    store.set_instance_state(inst.id, InstanceState.ANALYZED)
    done = store.set_instance_state(inst.id, InstanceState.EXPORTED)
    assert done.exported_at is not None and done.finished_at is not None
    assert store.pending_instances() == []

    kinds = [e.kind for e in store.list_events(instance_id=inst.id)]
    assert kinds == ["instance.received", "instance.queued", "instance.analyzed", "instance.exported"]
    store.end_association(assoc, "released", stored=1)
    row = store.get_association(assoc)
    assert (row.result, row.instances_stored, row.ended_at is not None) == ("released", 1, True)


def test_one_live_row_per_sop_instance_uid(store: AuditStore) -> None:
    first = store.record_instance_received(received("2.2"))
    with pytest.raises(DuplicateInstance):
        store.record_instance_received(received("2.2"))
    dup = store.record_duplicate(received("2.2"), first.id)
    assert dup.state == InstanceState.DUPLICATE
    rejected = store.record_rejected(received("2.2"), status=0xA900, reason="bad", quarantine_path="/q/x.dcm")
    assert store.find_live_instance("2.2").id == first.id  # type: ignore[union-attr]
    rows = store.list_instances(InstanceFilter(sop_instance_uid="2.2"))
    assert [r.state for r in rows] == ["received", "duplicate", "rejected"]
    assert rows[1].duplicate_of_id == first.id and rejected.quarantine_path == "/q/x.dcm"


def test_exports_and_attempts(store: AuditStore) -> None:
    inst = store.record_instance_received(received("3.3"))
    export = store.create_export(inst.id, destination_ae="PACS", kind="seg", file_path="/r/seg.dcm")
    assert export.state == ExportState.PENDING and [e.id for e in store.due_exports()] == [export.id]
    later = datetime.now(UTC) + timedelta(minutes=5)
    retry = store.record_export_attempt(
        export.id, status=0xA700, error="out of resources", succeeded=False, next_attempt_at=later
    )
    assert (retry.state, retry.attempts, retry.last_error) == ("pending", 1, "out of resources")
    assert store.due_exports() == []
    sent = store.record_export_attempt(export.id, status=0x0000, succeeded=True)
    assert (sent.state, sent.attempts, sent.sent_at is not None) == ("sent", 2, True)
    assert [a.status for a in store.list_export_attempts(export.id)] == [0xA700, 0x0000]

    other = store.create_export(inst.id, destination_ae="PACS", kind="sr", file_path="/r/sr.dcm")
    dead = store.record_export_attempt(other.id, status=None, error="connection refused", succeeded=False, give_up=True)
    assert dead.state == ExportState.DEAD
    assert [e.kind for e in store.list_events(kinds=["export.sent", "export.retry", "export.dead"])] == [
        "export.retry",
        "export.sent",
        "export.dead",
    ]


def test_ae_titles_and_seeding(store: AuditStore) -> None:
    from node.runtime.config import AEEntry

    entries = [AEEntry(name="PACS", host="10.0.0.1", port=104), AEEntry(name="CR1", role="source")]
    assert store.seed_ae(entries) == 2
    assert store.seed_ae(entries) == 0  # existing entries are the administrator's: left alone
    store.update_ae("PACS", port=11112, actor="web:admin")
    assert store.get_ae("PACS").port == 11112  # type: ignore[union-attr]
    (event,) = store.list_events(kinds=["ae.updated"])
    assert event.actor == "web:admin" and event.detail["before"]["port"] == 104
    with pytest.raises(StoreError):
        store.add_ae("CR1")


def test_audit_cli_studies_study_events(
    store: AuditStore, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = store.record_instance_received(received("4.1", study="9.1", ae="PACS"))
    store.set_instance_state(a.id, "queued")
    b = store.record_instance_received(received("4.2", study="9.2", ae="CT1"))
    store.set_instance_state(b.id, "skipped", "modality CT not routed")
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path}"\n[database]\nurl = "{database_url}"\n')
    c = ["--config", str(config)]

    assert main(["audit", "studies", *c, "--json"]) == 0
    studies = json.loads(capsys.readouterr().out)
    assert [(s["study_instance_uid"], s["states"]) for s in studies] == [("9.1", "queued=1"), ("9.2", "skipped=1")]
    assert main(["audit", "studies", *c, "--ae", "CT1", "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["study_instance_uid"] for r in rows] == ["9.2"]
    assert main(["audit", "studies", *c, "--state", "queued", "--json"]) == 0
    assert [s["study_instance_uid"] for s in json.loads(capsys.readouterr().out)] == ["9.1"]
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert main(["audit", "studies", *c, "--since", tomorrow, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []

    assert main(["audit", "study", "9.2", *c, "--json"]) == 0
    (inst,) = json.loads(capsys.readouterr().out)
    assert (inst["sop_instance_uid"], inst["state"], inst["reason"]) == ("4.2", "skipped", "modality CT not routed")
    assert main(["audit", "study", "no.such.study", *c]) == 1

    assert main(["audit", "events", *c, "--state", "skipped", "--json"]) == 0
    (event,) = json.loads(capsys.readouterr().out)
    assert event["kind"] == "instance.skipped" and event["detail"]["reason"] == "modality CT not routed"
    assert main(["audit", "events", *c, "--ae", "PACS", "--json"]) == 0
    assert {e["instance_id"] for e in json.loads(capsys.readouterr().out)} == {a.id}
    assert main(["audit", "events", *c]) == 0
    assert "instance.received" in capsys.readouterr().out
