"""node.finish against a real audit database: one transaction per outcome, idempotent, stale results dropped,
masks mapped back with the geometry kept at publish time.

The result is what a worker would return (synthetic masks on the prepared grid); the SEG and SR are
really built and written. The crash test injects a real database failure (an SQLite trigger) at the
step that marks the instance analyzed, and checks that nothing of the run was left half-registered.
Publishing goes to the embedded (SQLite) broker; no worker consumes it.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.multival import MultiValue
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from node.analysis.celery_app import make_celery
from node.analysis.finish import finish_analysis
from node.analysis.outbox import Publisher
from node.analysis.prepare import Geometry, masks_to_source, prepare
from node.audit import AuditStore, ExportState, Instance, InstanceState, ReceivedInstance
from node.results.seg import segment_numbers
from node.runtime.config import Settings, load_settings
from tests.support.paths import dicom_dir
from tests.support.synthetic_results import synthetic_masks, synthetic_result
from tests.support.validators import dciodvfy
from workers.api import AnalyzeResult

CHEST = dicom_dir() / "09_cr_8bit_alloc8.dcm"
PADDED = dicom_dir() / "11_cr_pixel_padding_value0.dcm"  # image in rows 112..943, cols 88..967: a real crop


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return load_settings(None, storage={"data_dir": str(tmp_path / "var")}, database={"url": database_url})


@pytest.fixture
def store(settings: Settings) -> Iterator[AuditStore]:
    s = AuditStore.open(settings.database_url)
    yield s
    s.close()


def queue(store: AuditStore, settings: Settings, destinations: list[str], source: Path = CHEST) -> Instance:
    """A received chest CR, routed to analysis with `destinations`; returns the queued row."""
    spool = settings.storage.data_dir / "spool.dcm"
    spool.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, spool)
    ds = pydicom.dcmread(spool, stop_before_pixels=True)
    row = store.record_instance_received(
        ReceivedInstance(
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            calling_ae="MODALITY",
            spool_path=str(spool),
        )
    )
    return store.set_instance_state(
        row.id, InstanceState.QUEUED, rule="chest", models=["lung", "opacity"], destinations=destinations
    )


def worker_result(inst: Instance) -> AnalyzeResult:
    """What the worker returns for the instance's current run."""
    prepared = prepare(inst.spool_path)
    result = synthetic_result(prepared.rows, prepared.cols, synthetic_masks(prepared.rows, prepared.cols))
    return dataclasses.replace(result, job_id=inst.job_id)


def event_kinds(store: AuditStore, instance_id: int) -> list[str]:
    return [e.kind for e in store.list_events(instance_id=instance_id)]


def test_crash_while_recording_leaves_nothing_half_done(tmp_path: Path) -> None:
    settings = load_settings(None, storage={"data_dir": str(tmp_path / "var")})
    store = AuditStore.open(settings.database_url)
    inst = queue(store, settings, ["PACS", "ARCHIVE"])
    result = worker_result(inst)
    before = event_kinds(store, inst.id)
    # The database refuses the step that marks the instance analyzed, as a crash at that point would.
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TRIGGER crash BEFORE UPDATE OF state ON instances WHEN NEW.state = 'analyzed' "
                "BEGIN SELECT RAISE(ABORT, 'injected crash'); END"
            )
        )
    with pytest.raises(DBAPIError, match="injected crash"):
        finish_analysis(settings, store, result)
    assert store.list_exports(inst.id) == []  # no export registered for a run that is not recorded
    assert store.get_instance(inst.id).state == InstanceState.QUEUED
    assert event_kinds(store, inst.id) == before

    # The redelivered task (acks_late) records the whole outcome once.
    with store.engine.begin() as conn:
        conn.execute(text("DROP TRIGGER crash"))
    assert finish_analysis(settings, store, result) == "analyzed"
    exports = store.list_exports(inst.id)
    assert sorted((e.destination_ae, e.kind) for e in exports) == [
        ("ARCHIVE", "seg"),
        ("ARCHIVE", "sr"),
        ("PACS", "seg"),
        ("PACS", "sr"),
    ]
    (analyzed,) = store.list_events(instance_id=inst.id, kinds=["instance.analyzed"])
    assert set(analyzed.detail["files"]) == {"seg", "sr"} and analyzed.detail["severity_score"] == 2
    store.close()


def test_same_result_twice_registers_exports_once(store: AuditStore, settings: Settings) -> None:
    inst = queue(store, settings, ["PACS", "reply-to-sender"])
    result = worker_result(inst)
    assert finish_analysis(settings, store, result) == "analyzed"
    first = [(e.id, e.destination_ae, e.kind) for e in store.list_exports(inst.id)]
    assert sorted(d for _, d, _ in first) == ["MODALITY", "MODALITY", "PACS", "PACS"]
    assert finish_analysis(settings, store, result) == "stale"  # the task ran twice
    assert [(e.id, e.destination_ae, e.kind) for e in store.list_exports(inst.id)] == first
    assert event_kinds(store, inst.id).count("instance.analyzed") == 1
    (stale,) = store.list_events(instance_id=inst.id, kinds=["analysis.stale_result"])
    assert stale.detail == {"job_id": result.job_id, "state": "analyzed"}


def test_result_of_a_superseded_run_is_stale(store: AuditStore, settings: Settings) -> None:
    inst = queue(store, settings, ["PACS"])
    old = worker_result(inst)
    rerun = store.set_instance_state(inst.id, InstanceState.FAILED, "operator")
    rerun = store.set_instance_state(inst.id, InstanceState.QUEUED, "re-run requested")
    assert rerun.job_id != old.job_id
    assert finish_analysis(settings, store, old) == "stale"
    assert finish_analysis(settings, store, dataclasses.replace(old, error="worker died")) == "stale"
    assert store.list_exports(inst.id) == [] and store.get_instance(inst.id).state == InstanceState.QUEUED
    assert finish_analysis(settings, store, dataclasses.replace(old, job_id=rerun.job_id)) == "analyzed"
    assert len(store.list_exports(inst.id)) == 2


def test_nothing_to_send_ends_exported(store: AuditStore, settings: Settings) -> None:
    inst = queue(store, settings, [])
    assert finish_analysis(settings, store, worker_result(inst)) == "analyzed"
    done = store.get_instance(inst.id)
    assert (done.state, done.reason) == (InstanceState.EXPORTED, "nothing to send: no destinations for this rule")
    assert event_kinds(store, inst.id)[-2:] == ["instance.analyzed", "instance.exported"]
    assert store.list_exports(inst.id) == []


def test_last_export_attempt_settles_the_instance(store: AuditStore, settings: Settings) -> None:
    inst = queue(store, settings, ["PACS"])
    assert finish_analysis(settings, store, worker_result(inst)) == "analyzed"
    seg, sr = store.list_exports(inst.id)
    settled: list[Instance] = []
    store.record_export_attempt(seg.id, status=0, succeeded=True, on_settled=settled.append)
    assert settled == [] and store.get_instance(inst.id).state == InstanceState.ANALYZED  # SR still pending
    store.record_export_attempt(
        sr.id, status=None, error="connection refused", succeeded=False, give_up=True, on_settled=settled.append
    )
    assert [i.state for i in settled] == [InstanceState.DEAD]
    assert "1 export(s) undeliverable: connection refused" in store.get_instance(inst.id).reason

    # A re-run: the dead export of the first run no longer counts once the new run's exports are sent.
    store.set_instance_state(inst.id, InstanceState.QUEUED, "re-run requested")
    assert finish_analysis(settings, store, worker_result(store.get_instance(inst.id))) == "analyzed"
    for export in store.list_exports(inst.id, state=ExportState.PENDING):
        store.record_export_attempt(export.id, status=0, succeeded=True, on_settled=settled.append)
    assert [i.state for i in settled] == [InstanceState.DEAD, InstanceState.EXPORTED]
    assert store.get_instance(inst.id).state == InstanceState.EXPORTED


def strip_pixels(path: Path) -> None:
    """Leave only the header: a source that can no longer be prepared (decoded) at all."""
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)


def seg_masks(path: Path) -> dict[str, np.ndarray]:
    """Mask name -> source-grid mask, read back from a SEG the node wrote."""
    seg = pydicom.dcmread(path)
    names = {number: name for name, number in segment_numbers(seg).items()}
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    masks: dict[str, np.ndarray] = {}
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        name = names[int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
        masks[name] = frame.astype(bool)
    return masks


@pytest.mark.parametrize("source", [PADDED, CHEST], ids=["padded", "plain"])
def test_publish_keeps_the_geometry_that_prepare_gives(store: AuditStore, settings: Settings, source: Path) -> None:
    inst = queue(store, settings, ["PACS"], source)
    assert Publisher(make_celery(settings)).publish(settings, store, inst.id)
    stored = store.get_instance(inst.id).prepared_geometry
    expected = prepare(source).geometry
    assert stored == {**expected.to_json(), "job_id": inst.job_id}
    assert Geometry.from_json(stored) == expected
    if source == PADDED:
        assert expected.crop == (112, 88, 944, 968) and (expected.rows, expected.cols) != (1024, 1024)


def test_finish_uses_the_published_geometry_and_never_decodes_the_source(store: AuditStore, settings: Settings) -> None:
    inst = queue(store, settings, ["PACS"], PADDED)
    assert Publisher(make_celery(settings)).publish(settings, store, inst.id)
    geometry = prepare(inst.spool_path).geometry
    small = synthetic_masks(geometry.rows, geometry.cols)
    result = dataclasses.replace(synthetic_result(geometry.rows, geometry.cols, small), job_id=inst.job_id)
    strip_pixels(Path(inst.spool_path))  # preparing it now would fail: "no Pixel Data"

    assert finish_analysis(settings, store, result) == "analyzed"
    (seg,) = [e for e in store.list_exports(inst.id) if e.kind == "seg"]
    written = seg_masks(Path(seg.file_path))
    assert set(written) == {"right_lung", "left_lung", "opacity", "pneumothorax"}
    for name, mask in written.items():
        assert np.array_equal(mask, masks_to_source(small[name], geometry)), name
        assert not mask[:112].any() and not mask[:, :88].any(), name  # nothing drawn on the padding


def test_jobs_published_before_the_geometry_was_kept_prepare_again(store: AuditStore, settings: Settings) -> None:
    inst = queue(store, settings, ["PACS"], PADDED)  # queued, never published by this version: no geometry
    assert inst.prepared_geometry is None
    result = worker_result(inst)
    assert finish_analysis(settings, store, result) == "analyzed"

    # Without a stored geometry finish prepares the source: a source it cannot prepare fails the run.
    store.set_instance_state(inst.id, InstanceState.FAILED, "operator")
    rerun = store.set_instance_state(inst.id, InstanceState.QUEUED, "re-run requested")
    strip_pixels(Path(inst.spool_path))
    assert finish_analysis(settings, store, dataclasses.replace(result, job_id=rerun.job_id)) == "failed"
    assert store.get_instance(inst.id).reason == "building results failed: no Pixel Data: not an image"


QUIRKS: dict[str, dict[str, str | None]] = {
    # Anonymised files often leave Type 2 attributes out (None: deleted).
    "type 2 left out": {k: None for k in ("PatientName", "PatientBirthDate", "PatientSex", "StudyID", "StudyTime")},
    # Legacy and lenient forms real senders write.
    "legacy forms": {"PatientBirthDate": "1960-01-01", "StudyDate": "2026.12.01", "StudyTime": "10:15:00"},
    "sex spelled out": {"PatientSex": "MALE"},
    "unreadable date": {"PatientBirthDate": "unknown"},
    # Character sets: a typo pydicom reads anyway, the default spelled out, Korean (valid DICOM that the
    # result builder does not list), Japanese with an empty first value.
    "charset typo": {"SpecificCharacterSet": "ISO_IR100", "PatientName": "Müller^Jürgen"},
    "charset default spelled out": {"SpecificCharacterSet": "ISO_IR 6"},
    "charset korean": {"SpecificCharacterSet": "\\ISO 2022 IR 149", "PatientName": "Hong^Gildong=홍^길동"},
    "charset japanese": {"SpecificCharacterSet": "\\ISO 2022 IR 87", "PatientName": "Yamada^Tarou=山田^太郎"},
}
#: What the results carry for each quirk (the rest as in the source).
EXPECTED: dict[str, dict[str, str | None]] = {  # None: absent
    "type 2 left out": {"PatientName": "", "PatientBirthDate": "", "PatientSex": "", "StudyID": "", "StudyTime": ""},
    "legacy forms": {"PatientBirthDate": "19600101", "StudyDate": "20261201", "StudyTime": "101500"},
    "sex spelled out": {"PatientSex": "M"},
    "unreadable date": {"PatientBirthDate": ""},
    "charset typo": {"SpecificCharacterSet": "ISO_IR 100", "PatientName": "Müller^Jürgen"},
    "charset default spelled out": {"SpecificCharacterSet": None},
    "charset korean": {"SpecificCharacterSet": "ISO_IR 192", "PatientName": "Hong^Gildong=홍^길동"},
    "charset japanese": {
        "SpecificCharacterSet": "ISO 2022 IR 6\\ISO 2022 IR 87",
        "PatientName": "Yamada^Tarou=山田^太郎",
    },
}


def _text(value: object) -> str:
    return "\\".join(str(v) for v in value) if isinstance(value, MultiValue) else str(value)


@pytest.mark.parametrize("quirk", QUIRKS)
def test_a_lenient_source_header_gets_valid_results(
    store: AuditStore, settings: Settings, tmp_path: Path, quirk: str
) -> None:
    """A source whose patient/study values are left out or in a legacy form is stored as sent, and its
    results carry the values in their standard form (empty when unreadable) instead of failing."""
    odd = tmp_path / "odd.dcm"
    ds = pydicom.dcmread(CHEST)
    for keyword, value in QUIRKS[quirk].items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(odd)
    inst = queue(store, settings, ["PACS"], source=odd)
    assert finish_analysis(settings, store, worker_result(inst)) == "analyzed"
    assert pydicom.dcmread(inst.spool_path).get("PatientSex") == ds.get("PatientSex")  # the stored file: as sent
    for export in store.list_exports(inst.id):
        result = pydicom.dcmread(export.file_path)
        got = {k: _text(result[k].value) if k in result else None for k in EXPECTED[quirk]}
        assert got == EXPECTED[quirk], export.kind
        assert result.PatientID == ds.PatientID
        report = dciodvfy(Path(export.file_path))
        assert report.errors == [], report
