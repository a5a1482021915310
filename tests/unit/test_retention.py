"""Retention removes files of finished instances after keep_days, never of failed/dead ones."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from node.audit import AuditStore, InstanceState, ReceivedInstance
from node.audit.models import utcnow
from node.runtime.config import load_settings
from node.runtime.retention import purge


def _instance(store: AuditStore, tmp: Path, uid: str, state: InstanceState) -> tuple[int, Path]:
    spool = tmp / f"{uid}.dcm"
    spool.write_bytes(b"DICM")
    row = store.record_instance_received(
        ReceivedInstance(sop_instance_uid=uid, sop_class_uid="1.2", study_instance_uid="1.2.3", spool_path=str(spool))
    )
    for step in {
        InstanceState.EXPORTED: ("queued", "analyzed", "exported"),
        InstanceState.SKIPPED: ("skipped",),
        InstanceState.DEAD: ("queued", "analyzed", "dead"),
        InstanceState.QUEUED: ("queued",),
    }[state]:
        store.set_instance_state(row.id, step)
    return row.id, spool


def test_purge_after_keep_days_keeps_undelivered_and_recent(tmp_path: Path) -> None:
    settings = load_settings(None, storage={"data_dir": str(tmp_path), "keep_days": 7})
    store = AuditStore.open(f"sqlite:///{tmp_path / 'audit.db'}")
    exported, exported_file = _instance(store, tmp_path, "1.1", InstanceState.EXPORTED)
    skipped, skipped_file = _instance(store, tmp_path, "1.2", InstanceState.SKIPPED)
    _, dead_file = _instance(store, tmp_path, "1.3", InstanceState.DEAD)
    _, queued_file = _instance(store, tmp_path, "1.4", InstanceState.QUEUED)
    results = settings.storage.results_dir / str(exported) / "123"
    results.mkdir(parents=True)
    (results / "seg.dcm").write_bytes(b"x")

    assert purge(settings, store) == 0  # everything is recent
    assert purge(settings, store, now=utcnow() + timedelta(days=8)) == 2
    assert not exported_file.exists() and not skipped_file.exists()
    assert not (settings.storage.results_dir / str(exported)).exists()
    assert dead_file.exists() and queued_file.exists()  # undelivered or unfinished work is never purged
    assert store.get_instance(exported).spool_path == ""
    assert [e.kind for e in store.list_events(instance_id=skipped)][-1] == "instance.purged"
    assert purge(settings, store, now=utcnow() + timedelta(days=8)) == 0  # idempotent


def test_keep_days_zero_keeps_everything(tmp_path: Path) -> None:
    settings = load_settings(None, storage={"data_dir": str(tmp_path)})
    store = AuditStore.open(f"sqlite:///{tmp_path / 'audit.db'}")
    _, path = _instance(store, tmp_path, "2.1", InstanceState.EXPORTED)
    assert purge(settings, store, now=utcnow() + timedelta(days=3650)) == 0
    assert path.exists()
