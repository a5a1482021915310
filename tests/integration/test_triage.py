"""Study-level triage against a real audit database (SQLite and PostgreSQL).

Instances are recorded as ingest and node.finish record them (the worker's figures in the
``instance.analyzed`` event); the engine then decides each stable study, once, and queues the alerts
the routes ask for, one per destination and finding.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.alerts.message import NOT_FOR_DIAGNOSTIC_USE, TriageAlert
from node.audit import AuditStore, InstanceState, ReceivedInstance
from node.audit.models import AlertState, Export
from node.results import codes
from node.runtime import metrics
from node.runtime.config import Settings, load_settings
from node.triage.engine import TriageEngine
from node.triage.report import KIND
from tests.support.validators import dciodvfy

CR = "1.2.840.10008.5.1.4.1.1.1"
HOOK = {"name": "hook", "type": "webhook", "url": "http://127.0.0.1:9/", "secret": "s3cret"}
RIS = {"name": "ris", "type": "hl7", "host": "127.0.0.1", "port": 9}


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return load_settings(
        None,
        storage={"data_dir": str(tmp_path / "var")},
        database={"url": database_url},
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


def header_file(folder: Path, *, study_uid: str, patient_id: str, study_date: str) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CR
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.Modality, ds.SeriesInstanceUID = CR, "CR", generate_uid()
    ds.StudyInstanceUID, ds.PatientID, ds.StudyDate = study_uid, patient_id, study_date
    ds.IssuerOfPatientID, ds.PatientName, ds.PatientSex, ds.PatientBirthDate = "HOSP", "Doe^Jane", "F", "19600101"
    ds.AccessionNumber, ds.StudyTime, ds.StudyID = "ACC" + study_date[-4:], "101500", "1"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def figures(severity: int | None, ptx: float | None, status: str = "experimental") -> dict[str, Any]:
    return {
        "severity_score": severity,
        "pneumothorax_probability": ptx,
        "pneumothorax_present": None if ptx is None else ptx >= 0.5,
        "pneumothorax_side": "left" if ptx and ptx >= 0.5 else None,
        "model_cards": [
            {"name": n, "version": "2", "status": status, "sha256": n[0] * 64, "architecture": "unet"}
            for n in ("lung", "opacity", "pneumothorax")
        ],
    }


def receive(
    store: AuditStore,
    settings: Settings,
    *,
    study_uid: str,
    patient_id: str = "P1",
    study_date: str = "20261201",
    detail: dict[str, Any] | None = None,
    destinations: tuple[str, ...] = (),
) -> int:
    """One instance of the study: analysed with `detail` as the worker's figures, or skipped (lateral);
    its results go to `destinations` (none by default: no study summary SR)."""
    spool = header_file(
        settings.storage.data_dir / "spool", study_uid=study_uid, patient_id=patient_id, study_date=study_date
    )
    ds = pydicom.dcmread(spool)
    row = store.record_instance_received(
        ReceivedInstance(
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=CR,
            study_instance_uid=study_uid,
            series_instance_uid=str(ds.SeriesInstanceUID),
            patient_id=patient_id,
            study_date=study_date,
            calling_ae="MODALITY",
            spool_path=str(spool),
        )
    )
    if detail is None:
        store.set_instance_state(row.id, InstanceState.SKIPPED, reason="lateral view")
        return row.id
    queued = store.set_instance_state(row.id, InstanceState.QUEUED, rule="chest", destinations=list(destinations))
    store.record_analysis(queued.job_id, exports=[], files={}, detail=detail)
    return row.id


def test_a_study_is_decided_once_with_its_alerts(store: AuditStore, settings: Settings) -> None:
    study = generate_uid()
    receive(store, settings, study_uid=study, detail=figures(2, 0.1))
    receive(store, settings, study_uid=study, detail=figures(5, 0.2))
    receive(store, settings, study_uid=study)  # a lateral: stored, not analysed
    engine = TriageEngine(settings, store)
    assert engine.run_once() == 1
    [row] = store.list_triage()
    assert (row.triage.level, row.triage.revision, row.triage.severity_score) == ("urgent", 1, 5)
    assert row.triage.summary["images"] == 2 and row.triage.patient_id == "P1"
    [alert] = store.list_alerts()
    assert (alert.destination, alert.kind, alert.findings, alert.state) == (
        "ris",
        "hl7",
        ["severe-opacity"],
        AlertState.PENDING,
    )
    message = TriageAlert.from_json(alert.payload)
    assert message.alert_id == alert.alert_id and message.level == "urgent" and message.revision == 1
    assert (message.patient_id, message.issuer_of_patient_id, message.patient_name) == ("P1", "HOSP", "Doe^Jane")
    assert message.experimental and message.note == NOT_FOR_DIAGNOSTIC_USE
    assert engine.run_once() == 0, "a decided study with nothing new is not decided again"
    assert [e.detail["level"] for e in store.list_events(kinds=["triage.decided"])] == ["urgent"]


def test_a_late_image_updates_the_study_and_alerts_only_new_findings(store: AuditStore, settings: Settings) -> None:
    study = generate_uid()
    receive(store, settings, study_uid=study, detail=figures(5, 0.1))
    engine = TriageEngine(settings, store)
    engine.run_once()
    receive(store, settings, study_uid=study, detail=figures(4, 0.9))  # late: a pneumothorax
    assert engine.run_once() == 1
    [row] = store.list_triage()
    assert (row.triage.level, row.triage.revision) == ("critical", 2)
    alerts = sorted(store.list_alerts(), key=lambda a: a.id)
    assert [(a.destination, a.level, a.findings) for a in alerts] == [
        ("ris", "urgent", ["severe-opacity"]),
        ("ris", "critical", ["pneumothorax", "severe-opacity"]),
        ("hook", "critical", ["pneumothorax", "severe-opacity"]),
    ]
    assert TriageAlert.from_json(alerts[1].payload).revision == 2
    # Another late image with the same findings: a new decision input, no new alert.
    receive(store, settings, study_uid=study, detail=figures(3, 0.8))
    assert engine.run_once() == 1
    assert len(store.list_alerts()) == 3


def test_priors_give_the_change(store: AuditStore, settings: Settings) -> None:
    first, second, other = generate_uid(), generate_uid(), generate_uid()
    engine = TriageEngine(settings, store)
    receive(store, settings, study_uid=first, study_date="20261120", detail=figures(1, 0.1))
    receive(store, settings, study_uid=other, patient_id="P2", study_date="20261125", detail=figures(0, 0.1))
    engine.run_once()
    receive(store, settings, study_uid=second, study_date="20261201", detail=figures(3, 0.1))
    engine.run_once()
    rows = {r.study.study_instance_uid: r.triage for r in store.list_triage()}
    assert rows[second].summary["prior"] == {"study_instance_uid": first, "study_date": "20261120", "severity_score": 1}
    assert rows[second].summary["severity_change"] == 2 and rows[second].level == "urgent"
    assert "worsening" in rows[second].summary["fired"]
    [alert] = [a for a in store.list_alerts() if a.level == "urgent" and a.findings == ["worsening"]]
    message = TriageAlert.from_json(alert.payload)
    assert message.severity_change == 2 and message.prior is not None and message.prior.study_instance_uid == first


def test_a_study_without_analysable_images_is_routine(store: AuditStore, settings: Settings) -> None:
    study = generate_uid()
    receive(store, settings, study_uid=study)
    TriageEngine(settings, store).run_once()
    [row] = store.list_triage()
    assert row.triage.level == "routine" and row.triage.reasons == ["no analysable image"]
    assert store.list_alerts() == []


def test_experimental_findings_raise_nothing_by_default(store: AuditStore, settings: Settings) -> None:
    strict = settings.model_copy(update={"triage": settings.triage.model_copy(update={"allow_experimental": False})})
    receive(store, settings, study_uid=generate_uid(), detail=figures(6, 0.99))
    TriageEngine(strict, store).run_once()
    [row] = store.list_triage()
    assert row.triage.level == "routine" and all("experimental" in r for r in row.triage.reasons)
    assert store.list_alerts() == []


def test_a_study_still_being_analysed_waits(store: AuditStore, settings: Settings) -> None:
    study = generate_uid()
    receive(store, settings, study_uid=study, detail=figures(5, 0.1))
    spool = header_file(settings.storage.data_dir / "spool", study_uid=study, patient_id="P1", study_date="20261201")
    row = store.record_instance_received(
        ReceivedInstance(
            sop_instance_uid=generate_uid(), sop_class_uid=CR, study_instance_uid=study, spool_path=str(spool)
        )
    )
    store.set_instance_state(row.id, InstanceState.QUEUED, rule="chest", destinations=[])
    assert TriageEngine(settings, store).run_once() == 0


def test_a_prior_that_arrives_later_reopens_the_later_study(store: AuditStore, settings: Settings) -> None:
    later, earlier = generate_uid(), generate_uid()
    engine = TriageEngine(settings, store)
    receive(store, settings, study_uid=later, study_date="20261201", detail=figures(3, 0.1))
    engine.run_once()
    assert {r.study.study_instance_uid: r.triage.level for r in store.list_triage()} == {later: "routine"}
    receive(store, settings, study_uid=earlier, study_date="20261101", detail=figures(0, 0.1))
    engine.run_once()  # decides the earlier study, which re-opens the later one
    engine.run_once()
    rows = {r.study.study_instance_uid: r.triage for r in store.list_triage()}
    assert rows[later].summary["prior"]["study_instance_uid"] == earlier
    assert (rows[later].level, rows[later].revision, rows[later].summary["severity_change"]) == ("urgent", 2, 3)
    assert [a.findings for a in store.list_alerts()] == [["worsening"]]
    assert len(store.list_events(kinds=["triage.reopened"])) == 1
    engine.run_once()
    assert len(store.list_events(kinds=["triage.reopened"])) == 1, "re-opened once, not in a loop"


def summary_reports(store: AuditStore) -> list[tuple[Export, pydicom.Dataset]]:
    """The study summary SRs queued so far (one export each here: one destination), oldest first."""
    rows = [e for i in store.list_instances() for e in store.list_exports(i.id) if e.kind == KIND]
    return [(e, pydicom.dcmread(e.file_path)) for e in sorted(rows, key=lambda e: e.id)]


def content_items(ds: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def comments(ds: pydicom.Dataset) -> list[str]:
    return [str(i.TextValue) for i in content_items(ds) if "TextValue" in i]


def source_of(ds: pydicom.Dataset, concept: str) -> str:
    """The SOP Instance UID of the image a NUM item with concept name `concept` was measured on."""
    for item in content_items(ds):
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == concept:
            image = next(c for c in item.ContentSequence if c.ValueType == "IMAGE")
            return str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    raise AssertionError(f"no {concept} measurement")


def test_each_revision_issues_a_summary_sr_that_replaces_the_last(store: AuditStore, settings: Settings) -> None:
    study = generate_uid()
    engine = TriageEngine(settings, store)
    first = receive(store, settings, study_uid=study, detail=figures(5, 0.1), destinations=("PACS",))
    before = metrics.TRIAGE_DECISIONS.labels(level="critical")._value.get()
    engine.run_once()
    [(export, one)] = summary_reports(store)
    assert (export.instance_id, export.destination_ae, export.sop_instance_uid) == (first, "PACS", one.SOPInstanceUID)
    assert (one.InstanceNumber, one.StudyInstanceUID, "PredecessorDocumentsSequence" in one) == (1, study, False)
    assert "Triage level: urgent (revision 1)" in comments(one)
    assert one.SeriesDescription.endswith("NOT FOR DIAGNOSTIC USE")  # the figures are experimental models'
    first_uid = store.get_instance(first).sop_instance_uid
    assert source_of(one, codes.SEVERITY.value) == first_uid
    # A late image with a pneumothorax: revision 2 replaces revision 1, in the same series.
    late = receive(store, settings, study_uid=study, detail=figures(4, 0.9), destinations=("PACS",))
    engine.run_once()
    [_, (export2, two)] = summary_reports(store)
    assert (two.InstanceNumber, two.SeriesInstanceUID) == (2, one.SeriesInstanceUID)
    [replaced] = two.PredecessorDocumentsSequence
    assert replaced.StudyInstanceUID == study
    assert replaced.ReferencedSeriesSequence[0].SeriesInstanceUID == one.SeriesInstanceUID
    assert replaced.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == one.SOPInstanceUID
    assert "Triage level: critical (revision 2)" in comments(two)
    assert source_of(two, codes.SEVERITY.value) == first_uid  # still the worst severity
    assert source_of(two, "122157") == store.get_instance(late).sop_instance_uid  # DCM Probability
    (decided,) = [e for e in store.list_events(kinds=["triage.decided"]) if e.detail["revision"] == 2]
    assert decided.detail["report_sop_instance_uid"] == two.SOPInstanceUID == export2.sop_instance_uid
    assert store.get_triage(store.get_instance(first).study_id or 0).report_sop_uid == two.SOPInstanceUID  # type: ignore[union-attr]
    for ds in (one, two):
        path = next(e.file_path for e, d in summary_reports(store) if d.SOPInstanceUID == ds.SOPInstanceUID)
        report = dciodvfy(Path(path))
        assert (report.errors, report.warnings) == ([], []), report
    # A lateral arrives: the study is checked again, the decision stands: no new report, no new count.
    receive(store, settings, study_uid=study, destinations=("PACS",))
    assert engine.run_once() == 1
    assert len(summary_reports(store)) == 2
    assert metrics.TRIAGE_DECISIONS.labels(level="critical")._value.get() == before + 1


def test_no_summary_sr_without_destinations_or_when_switched_off(store: AuditStore, settings: Settings) -> None:
    receive(store, settings, study_uid=generate_uid(), detail=figures(5, 0.1))  # results go nowhere
    off = settings.model_copy(update={"results": settings.results.model_copy(update={"study_sr": False})})
    receive(store, settings, study_uid=generate_uid(), detail=figures(5, 0.1), destinations=("PACS",))
    TriageEngine(off, store).run_once()
    assert summary_reports(store) == [] and len(store.list_triage()) == 2
