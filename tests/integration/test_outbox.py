"""The outbox between the audit log and the broker: publish, re-publish, give up, never publish junk."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pydicom
import pytest

from node.analysis.celery_app import make_celery
from node.analysis.outbox import Publisher
from node.audit import AuditStore, InstanceState, ReceivedInstance
from node.runtime.config import Settings, load_settings
from tests.support.paths import dicom_dir


def _queued(store: AuditStore, tmp: Path, name: str) -> int:
    spool = tmp / name
    shutil.copy(dicom_dir() / name, spool)
    ds = pydicom.dcmread(spool, stop_before_pixels=True, force=True)
    row = store.record_instance_received(
        ReceivedInstance(
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            spool_path=str(spool),
            priority=1,
        )
    )
    store.set_instance_state(row.id, InstanceState.QUEUED, models=["lung", "opacity"])
    return row.id


def _messages(settings: Settings) -> list[str]:
    with sqlite3.connect(settings.storage.data_dir / "broker.db") as db:
        return [r[0] for r in db.execute("SELECT payload FROM kombu_message")]


def test_publish_then_republish_then_give_up(tmp_path: Path) -> None:
    settings = load_settings(None, storage={"data_dir": str(tmp_path)})
    store = AuditStore.open(settings.database_url)
    publisher = Publisher(make_celery(settings), republish_after_s=0, max_publishes=2)
    instance = _queued(store, tmp_path, "02_cr_implicit_le_12bit.dcm")

    assert publisher.publish(settings, store, instance)
    payloads = _messages(settings)
    assert len(payloads) == 1
    # No patient identifiers travel to the workers: pixels and an opaque job id only.
    source = pydicom.dcmread(dicom_dir() / "02_cr_implicit_le_12bit.dcm", stop_before_pixels=True)
    for value in (
        str(source.PatientID),
        str(source.PatientName),
        str(source.SOPInstanceUID),
        str(source.StudyInstanceUID),
    ):
        assert value not in payloads[0]

    assert publisher.publish(settings, store, instance)  # no result came back in time: sent again
    assert len(_messages(settings)) == 2
    assert not publisher.publish(settings, store, instance)  # third time: give up, say why
    inst = store.get_instance(instance)
    assert inst.state == InstanceState.FAILED and "no analysis result after 2 attempts" in inst.reason
    kinds = [e.kind for e in store.list_events(instance_id=instance)]
    assert kinds.count("analysis.published") == 2


def test_not_republished_while_waiting_and_undecodable_pixels_fail_once(tmp_path: Path) -> None:
    settings = load_settings(None, storage={"data_dir": str(tmp_path)})
    store = AuditStore.open(settings.database_url)
    publisher = Publisher(make_celery(settings))
    good = _queued(store, tmp_path, "09_cr_8bit_alloc8.dcm")
    assert publisher.publish(settings, store, good)
    assert not publisher.publish(settings, store, good)  # published recently: the sweeper leaves it
    assert len(_messages(settings)) == 1

    multiframe = _queued(store, tmp_path, "37_bad_multiframe_cr_2frames.dcm")
    assert not publisher.publish(settings, store, multiframe)
    inst = store.get_instance(multiframe)
    assert inst.state == InstanceState.FAILED and inst.reason.startswith("cannot prepare pixels: multi-frame")
    assert len(_messages(settings)) == 1


def test_sweeper_leaves_jobs_another_process_published(tmp_path: Path) -> None:
    from node.analysis.finish import job_id_for
    from node.analysis.handoff import Dispatcher, HandoffContext
    from node.analysis.outbox import Sweeper

    settings = load_settings(None, storage={"data_dir": str(tmp_path)})
    store = AuditStore.open(settings.database_url)
    publisher = Publisher(make_celery(settings))
    dispatcher = Dispatcher(HandoffContext(settings, store), publisher)  # not started: submissions just queue up
    mine = _queued(store, tmp_path, "02_cr_implicit_le_12bit.dcm")
    theirs = _queued(store, tmp_path, "09_cr_8bit_alloc8.dcm")
    # A listener process published `theirs` and wrote it in the audit log.
    store.add_event(
        "analysis.published",
        instance_id=theirs,
        detail={"job_id": job_id_for(theirs, store.get_instance(theirs).queued_at)},
    )

    assert Sweeper(store, dispatcher, publisher, grace_s=3600).sweep_once() == 0  # both still fresh
    assert Sweeper(store, dispatcher, publisher, grace_s=0).sweep_once() == 1  # only `mine` is left over
    assert dispatcher._queue.get_nowait() == mine
    assert not publisher.due(job_id_for(theirs, store.get_instance(theirs).queued_at))


def test_unexpected_prepare_error_is_retried_a_bounded_number_of_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import node.analysis.outbox

    def broken(_path: object) -> None:
        raise MemoryError("no room to decode")

    monkeypatch.setattr(node.analysis.outbox, "prepare_isolated", lambda _settings, path: broken(path))
    settings = load_settings(None, storage={"data_dir": str(tmp_path)}, prepare={"max_attempts": 3})
    store = AuditStore.open(settings.database_url)
    publisher = Publisher(make_celery(settings))
    instance = _queued(store, tmp_path, "09_cr_8bit_alloc8.dcm")
    for _ in range(2):
        assert not publisher.publish(settings, store, instance)
        assert store.get_instance(instance).state == InstanceState.QUEUED  # maybe the node's fault: again
    assert not publisher.publish(settings, store, instance)
    inst = store.get_instance(instance)
    assert inst.state == InstanceState.FAILED
    assert inst.reason == "cannot prepare pixels after 3 attempts: MemoryError: no room to decode"
    errors = store.list_events(instance_id=instance, kinds=["analysis.prepare_error"])
    assert [e.detail["attempt"] for e in errors] == [1, 2, 3]
    assert not publisher.publish(settings, store, instance)  # final: nothing more is recorded
    assert len(store.list_events(instance_id=instance, kinds=["analysis.prepare_error"])) == 3
    assert not store.list_events(kinds=["analysis.published"])
