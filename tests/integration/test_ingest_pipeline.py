"""The ingest pipeline in-process (no network): resume after a crash, re-analysis of duplicates.

The network path is covered by test_ingest; these tests drive `Ingest` directly to reach the states a
crash leaves behind. They run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from node.analysis.handoff import Dispatcher, HandoffContext
from node.audit import AuditStore, InstanceFilter, InstanceState, ReceivedInstance
from node.ingest.accept import Ingest, StoreRequest
from node.ingest.header import read_header
from node.ingest.spool import Spool
from node.runtime.config import load_settings
from tests.support.paths import dicom_dir

CHEST = dicom_dir() / "09_cr_8bit_alloc8.dcm"
HAND = dicom_dir() / "25_cr_hand_bodypart.dcm"


@dataclass
class Harness:
    ingest: Ingest
    dispatcher: Dispatcher
    handed: list[int] = field(default_factory=list)

    def handed_off(self) -> list[int]:
        """Wait for the dispatcher to finish, then what it handed off, in order."""
        self.dispatcher.close()
        return self.handed


@pytest.fixture
def store(database_url: str) -> Iterator[AuditStore]:
    s = AuditStore.open(database_url)
    yield s
    s.close()


def harness(tmp_path: Path, store: AuditStore, **settings: Any) -> Harness:
    """Ingest with a real dispatcher whose hand-off records instance ids (standing in for the broker)."""
    cfg = load_settings(storage={"data_dir": tmp_path / "var", "min_free_mb": 1}, **settings)
    spool = Spool(cfg.storage.data_dir)
    spool.prepare()
    handed: list[int] = []
    dispatcher = Dispatcher(HandoffContext(cfg, store), fn=lambda _ctx, instance_id: handed.append(instance_id))
    return Harness(Ingest(cfg, store, spool, dispatcher.start()), dispatcher, handed)


def receive(ingest: Ingest, source: Path) -> int:
    """Hand a copy of a file to ingest the way the SCP does; returns the status for the peer."""
    h = read_header(source)
    tmp = ingest.spool.incoming / f"{source.stem}.part"
    shutil.copyfile(source, tmp)
    return ingest.receive(
        tmp,
        StoreRequest(
            affected_sop_class=h.sop_class_uid,
            affected_sop_instance=h.sop_instance_uid,
            transfer_syntax_uid=h.transfer_syntax_uid,
            calling_ae="PACS",
        ),
    ).status


def test_resume_routes_received_and_hands_off_queued(tmp_path: Path, store: AuditStore) -> None:
    # State a crash leaves: one instance committed but not routed, one queued but maybe never handed off.
    spool = Spool(tmp_path / "var")
    spool.prepare()
    rows = []
    for source in (CHEST, HAND):
        h = read_header(source)
        shutil.copyfile(source, spool.incoming / "x.part")
        path = spool.commit(spool.incoming / "x.part", h.study_instance_uid, h.sop_instance_uid)
        rows.append(
            store.record_instance_received(
                ReceivedInstance(
                    sop_instance_uid=h.sop_instance_uid,
                    sop_class_uid=h.sop_class_uid,
                    study_instance_uid=h.study_instance_uid,
                    calling_ae="PACS",
                    spool_path=str(path),
                )
            )
        )
    queued = store.record_instance_received(
        ReceivedInstance(sop_instance_uid="1.2.3.4", sop_class_uid="1.2", spool_path=str(spool.root / "y.dcm"))
    )
    store.set_instance_state(queued.id, InstanceState.QUEUED)
    lost = store.record_instance_received(
        ReceivedInstance(sop_instance_uid="5.6.7", sop_class_uid="1.2", spool_path=str(spool.root / "gone.dcm"))
    )

    h = harness(tmp_path, store)
    report = h.ingest.resume_pending()
    assert (report.rerouted, report.handed_off, report.failed) == (2, 1, 1)
    assert sorted(h.handed_off()) == sorted([rows[0].id, queued.id])
    assert store.get_instance(rows[0].id).state == InstanceState.QUEUED
    hand = store.get_instance(rows[1].id)
    assert (hand.state, hand.reason) == (InstanceState.SKIPPED, "not chest: BodyPartExamined HAND")
    assert store.get_instance(lost.id).state == InstanceState.FAILED
    assert [i.id for i in store.pending_instances()] == sorted([rows[0].id, queued.id])  # queued: not final


@pytest.mark.parametrize("reanalyze", [False, True])
def test_duplicates_reanalysed_only_when_configured(tmp_path: Path, store: AuditStore, reanalyze: bool) -> None:
    h = harness(tmp_path, store, results={"reanalyze_duplicates": reanalyze})
    assert receive(h.ingest, CHEST) == 0x0000
    (original,) = store.list_instances()
    store.set_instance_state(original.id, InstanceState.ANALYZED)
    assert receive(h.ingest, CHEST) == 0x0000  # still in progress: never queued twice
    store.set_instance_state(original.id, InstanceState.EXPORTED)
    assert receive(h.ingest, CHEST) == 0x0000
    assert h.handed_off() == ([original.id, original.id] if reanalyze else [original.id])
    states = [r.state for r in store.list_instances(InstanceFilter(sop_instance_uid=original.sop_instance_uid))]
    assert states == [
        InstanceState.QUEUED if reanalyze else InstanceState.EXPORTED,
        InstanceState.DUPLICATE,
        InstanceState.DUPLICATE,
    ]
    assert len(list(h.ingest.spool.root.glob("*/*.dcm"))) == 1


def test_disk_filling_during_an_association_answers_out_of_resources(tmp_path: Path, store: AuditStore) -> None:
    # The association was accepted above the watermark; the disk filled before this data set came.
    h = harness(tmp_path, store)
    h.ingest.settings.storage.min_free_mb = 10**9
    assert receive(h.ingest, CHEST) == 0xA700
    assert store.list_instances() == [] and not list(h.ingest.spool.root.glob("*/*.dcm"))
    (event,) = store.list_events(kinds=["instance.refused"])
    assert event.detail["status"] == "0xA700" and "min_free_mb" in event.detail["reason"]
