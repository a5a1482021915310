"""Triage end to end with real peers: storescu -> `cxrnode serve` (embedded broker, CPU worker) -> study
decision -> HL7 ORU^R01 at a real MLLP listener, a FHIR transaction at a real HTTP server, a signed
webhook; priors, a destination down then up, a rejected (AR) alert through the dead letter and back.

The worker runs tiny models pinned to constants (lungs and opacity everywhere, no pneumothorax), so
every analysed image scores severity 6: urgent by the default rules, with experimental models allowed.
The whole DICOM test set is sent as well: every study it makes gets a decision, and those without an
analysable image are routine with the reason "no analysable image".
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from hl7apy.parser import parse_message
from pydicom.uid import generate_uid

from node.alerts.webhook import verify
from node.audit.models import AlertState
from tests.e2e.test_pipeline import send_manifest, wait_final
from tests.support.dcmtk import storescu
from tests.support.http_receiver import HTTPReceiver
from tests.support.mllp import MLLPListener
from tests.support.net import free_port, wait_for
from tests.support.node import NodeProcess, cxrnode_command
from tests.support.orthanc import Orthanc
from tests.support.paths import dicom_dir, dicom_manifest
from tests.support.tiny_models import write_tiny_weights
from tests.support.validators import dciodvfy, pixelmed

pytestmark = pytest.mark.timeout(900)

TOKEN, SECRET = "fhir-test-token", "webhook-test-secret"
TEMPLATE = "02_cr_implicit_le_12bit.dcm"


@pytest.fixture(autouse=True)
def worker_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = write_tiny_weights(
        tmp_path / "weights", head_logits={"lung": (6.0, None), "opacity": (6.0, None), "pneumothorax": (-6.0, -6.0)}
    )
    monkeypatch.setenv("CXRNODE_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("CXRNODE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXRNODE_WORKER_THREADS", "1")


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[MLLPListener, HTTPReceiver, HTTPReceiver]]:
    ris = MLLPListener(tmp_path / "ris").start()
    ehr = HTTPReceiver(tmp_path / "fhir", "fhir", token=TOKEN).start()
    hook = HTTPReceiver(tmp_path / "hook", "webhook", secret=SECRET)  # started later: down, then up
    try:
        yield ris, ehr, hook
    finally:
        ris.stop()
        ehr.stop()
        hook.stop()


def study_files(out: Path, *, patient: str, study_date: str, views: tuple[str, ...]) -> tuple[str, list[Path]]:
    """One study of `views` (e.g. PA, PA, LL) made from one chest CR: same patient, new UIDs."""
    study = generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, view in enumerate(views):
        ds = pydicom.dcmread(dicom_dir() / TEMPLATE)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID, ds.IssuerOfPatientID, ds.PatientName = patient, "HOSP", "Triage^Test"
        ds.StudyDate, ds.AccessionNumber, ds.ViewPosition = study_date, accession(study_date), view
        ds.InstanceNumber = i + 1
        path = out / f"{i}.dcm"
        ds.save_as(path)
        files.append(path)
    return study, files


def accession(study_date: str) -> str:
    return f"ACC{study_date}"


def node_toml(ris: MLLPListener, ehr: HTTPReceiver, hook: HTTPReceiver) -> str:
    return (
        '\n[broker]\nurl = ""\nembedded_worker = true\n'
        '[[rules]]\nname = "chest"\ndestinations = []\n'
        'match = { modality = ["CR", "DX"], body_part = ["CHEST", ""], view_position = ["PA", "AP", ""] }\n'
        '[[rules]]\nname = "sc-chest"\ndestinations = []\nmatch = { modality = ["OT"], body_part = ["CHEST"] }\n'
        "[triage]\nstable_s = 2\nallow_experimental = true\nbackoff_initial_s = 0.5\nbackoff_factor = 1.0\n"
        "max_attempts = 200\n"
        f'[[triage.destinations]]\nname = "ris"\ntype = "hl7"\nhost = "127.0.0.1"\nport = {ris.port}\n'
        'timeout_s = 5\nreceiving_application = "RIS"\n'
        f'[[triage.destinations]]\nname = "ehr"\ntype = "fhir"\nbase_url = "{ehr.url}"\ntoken = "{TOKEN}"\n'
        "timeout_s = 5\n"
        f'[[triage.destinations]]\nname = "hook"\ntype = "webhook"\nurl = "{hook.url}"\nsecret = "{SECRET}"\n'
        "timeout_s = 5\n"
        '[triage.routes]\nurgent = ["ris", "ehr", "hook"]\ncritical = ["ris", "ehr", "hook"]\n'
    )


def hl7_for(ris: MLLPListener, accession: str) -> list[str]:
    """Messages about one study (a later study names an earlier one as its prior: match the accession)."""
    return [m for m in ris.messages() if accession in m]


def http_for(rx: HTTPReceiver, accession: str) -> list[dict[str, object]]:
    return [r for r in rx.requests() if accession in str(r["body"])]


def test_triage_alerts_with_real_peers(tmp_path: Path, peers: tuple[MLLPListener, HTTPReceiver, HTTPReceiver]) -> None:
    ris, ehr, hook = peers
    (tmp_path / "node").mkdir()
    node = NodeProcess(tmp_path / "node", extra_toml=node_toml(ris, ehr, hook), analysis=True)
    try:
        node.start()
        store = node.store()
        acc1, acc2 = accession("20261120"), accession("20261201")
        first, files = study_files(tmp_path / "s1", patient="PT-1", study_date="20261120", views=("PA", "PA", "LL"))
        assert storescu(node.port, files).returncode == 0
        # Every file of the test set too: each study it makes is decided.
        sent = send_manifest(node.port)
        accepted = [r for r in sent.values() if r["expect"] == "accept"]
        wait_final(node, len(files) + len(accepted))

        # One study, one result set, one message per destination; the webhook is down, so it is retried.
        wait_for(
            lambda: len(hl7_for(ris, acc1)) >= 1 and len(http_for(ehr, acc1)) >= 1,
            120,
            "HL7 and FHIR alerts for the first study",
        )
        wait_for(
            lambda: any(a.destination == "hook" and a.attempts >= 2 for a in store.list_alerts()),
            60,
            "webhook attempts while it is down",
        )
        hook.start()
        wait_for(lambda: len(http_for(hook, acc1)) >= 1, 60, "the webhook once it is up")
        [row] = [r for r in store.list_triage() if r.study.study_instance_uid == first]
        assert (row.triage.level, row.triage.revision, row.triage.summary["images"]) == ("urgent", 1, 2)
        [oru] = hl7_for(ris, acc1)
        msg = parse_message(oru.replace("\n", "\r"), find_groups=False)
        assert msg.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
        assert "PT-1" in msg.pid.pid_3.to_er7()
        [fhir] = http_for(ehr, acc1)
        assert fhir["answer"] == 201 and not fhir["problems"]
        [webhook] = http_for(hook, acc1)
        headers = {k.lower(): v for k, v in webhook["headers"].items()}  # type: ignore[union-attr]
        assert verify(
            SECRET.encode(),
            headers["x-cxrnode-timestamp"],
            headers["x-cxrnode-signature"],
            str(webhook["body"]).encode(),
            tolerance_s=3600,
        )
        body = json.loads(str(webhook["body"]))
        assert body["level"] == "urgent" and "patient_id" not in json.dumps(body)

        # Every study of the test set is decided (each once its images are analysed and it is stable);
        # those with no analysable image say so.
        analysable = {r["file"] for r in dicom_manifest() if r["analysable"] == "yes"}
        study_of = {
            r["file"]: str(
                pydicom.dcmread(dicom_dir() / r["file"], stop_before_pixels=True, force=True).StudyInstanceUID
            )
            for r in accepted
        }
        wait_for(
            lambda: set(study_of.values()) <= {r.study.study_instance_uid for r in store.list_triage()},
            240,
            "every study of the test set decided",
        )
        decided = {r.study.study_instance_uid: r.triage for r in store.list_triage()}
        for file, uid in study_of.items():
            assert uid in decided, file
            if file not in analysable:
                assert decided[uid].reasons == ["no analysable image"], file

        # A prior: the second study of the patient carries the change; the RIS rejects it (AR) -> dead.
        ris.set_ack("AR", text="unknown order")
        second, files2 = study_files(tmp_path / "s2", patient="PT-1", study_date="20261201", views=("AP",))
        assert storescu(node.port, files2).returncode == 0
        wait_for(
            lambda: any(a.state == AlertState.DEAD and a.destination == "ris" for a in store.list_alerts()),
            120,
            "the AR'd alert in the dead letter",
        )
        wait_for(
            lambda: len(http_for(hook, acc2)) >= 1 and len(http_for(ehr, acc2)) >= 1,
            60,
            "FHIR and webhook alerts for the second study",
        )
        [row2] = [r for r in store.list_triage() if r.study.study_instance_uid == second]
        assert row2.triage.summary["prior"]["study_instance_uid"] == first
        assert row2.triage.summary["severity_change"] == 0
        body2 = json.loads(str(http_for(hook, acc2)[0]["body"]))
        assert json.dumps(body2).count(first) >= 1, "the webhook names the prior study"
        sr = next(node.data_dir.glob("results/*/*/sr.dcm"), None)
        assert sr is not None
        srs = {p: pydicom.dcmread(p) for p in node.data_dir.glob("results/*/*/sr.dcm")}
        [(sr2_path, sr2)] = [(p, d) for p, d in srs.items() if d.StudyInstanceUID == second]
        assert sr2.PertinentOtherEvidenceSequence[0].StudyInstanceUID == first
        # The SR with its prior comparison, as the node made it: dciodvfy and PixelMed find nothing.
        report = dciodvfy(sr2_path)
        assert (report.errors, report.warnings) == ([], []), report
        [checked] = pixelmed([sr2_path])
        assert checked.errors == [], checked

        # Retry from the CLI once the RIS accepts again: delivered once, same control id.
        ris.set_ack("AA")
        retry = subprocess.run(
            [*cxrnode_command(), "alerts", "retry", "--all-dead", "--config", str(node.config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert retry.returncode == 0, retry.stderr
        wait_for(
            lambda: all(a.state == AlertState.SENT for a in store.list_alerts() if a.study_id == row2.study.id),
            60,
            "the retried alert to be sent",
        )
        to_ris = hl7_for(ris, acc2)
        assert len(to_ris) == 2  # the AR'd try and the accepted retry
        assert len({parse_message(m.replace("\n", "\r"), find_groups=False).msh.msh_10.to_er7() for m in to_ris}) == 1
        time.sleep(3)  # nothing more arrives: each alert exactly once
        assert len(hl7_for(ris, acc1)) == 1 and len(http_for(hook, acc1)) == 1
        assert len(http_for(ehr, acc1)) == 1
    finally:
        node.close()


def test_priors_are_fetched_from_the_archive(tmp_path: Path) -> None:
    """With triage.priors_from, a study whose patient has no prior here gets one by C-FIND/C-MOVE from Orthanc."""
    (tmp_path / "node").mkdir()
    hook = HTTPReceiver(tmp_path / "hook", "webhook", secret=SECRET).start()
    port = free_port()  # the archive must know the node as a move destination before either starts
    with Orthanc(tmp_path / "orthanc", modalities={"cxrnode": ("CXRNODE", "127.0.0.1", port)}) as archive:
        node = NodeProcess(
            tmp_path / "node", analysis=True, port=port, extra_toml=node_toml_priors(archive.dicom_port, hook)
        )
        try:
            prior_uid, prior_files = study_files(
                tmp_path / "prior", patient="PT-7", study_date="20261001", views=("PA",)
            )
            assert storescu(archive.dicom_port, prior_files, aec="ORTHANC").returncode == 0
            node.start()
            current, files = study_files(tmp_path / "now", patient="PT-7", study_date="20261202", views=("PA",))
            assert storescu(node.port, files).returncode == 0
            store = node.store()

            def compared() -> bool:
                rows = {r.study.study_instance_uid: r.triage for r in store.list_triage()}
                return (
                    current in rows
                    and (rows[current].summary.get("prior") or {}).get("study_instance_uid") == prior_uid
                )

            wait_for(compared, 300, "the current study decided against the prior moved in from the archive")
            [event] = store.list_events(kinds=["priors.requested"])
            assert event.detail["moved"] == prior_uid and event.detail["move_status"] == "0x0000"
            prior_study = store.get_study(prior_uid)
            assert prior_study is not None and prior_study.calling_ae == "ORTHANC"
            time.sleep(3)
            current_study = store.get_study(current)
            assert current_study is not None
            assert {a.study_id for a in store.list_alerts()} == {current_study.id}, "no alert for the old study"
        finally:
            node.close()
            hook.stop()


def node_toml_priors(archive_port: int, hook: HTTPReceiver) -> str:
    return (
        '\n[broker]\nurl = ""\nembedded_worker = true\n'
        '[[rules]]\nname = "chest"\ndestinations = []\n'
        'match = { modality = ["CR", "DX"], body_part = ["CHEST", ""], view_position = ["PA", "AP", ""] }\n'
        f'[[ae]]\nname = "ORTHANC"\nhost = "127.0.0.1"\nport = {archive_port}\nrole = "both"\n'
        '[triage]\nstable_s = 2\nallow_experimental = true\npriors_from = "ORTHANC"\n'
        f'[[triage.destinations]]\nname = "hook"\ntype = "webhook"\nurl = "{hook.url}"\nsecret = "{SECRET}"\n'
        '[triage.routes]\nurgent = ["hook"]\nroutine = ["hook"]\ncritical = ["hook"]\n'
    )
