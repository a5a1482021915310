"""STOW-RS destinations: the exporter delivers to a real Orthanc with its DICOMweb plugin (Debian
`orthanc-dicomweb`), with basic or bearer auth, and retries or dead-letters exactly as for C-STORE."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from node.audit import AuditStore, ExportState, ReceivedInstance
from node.dicomweb.client import StowDestination, send_stow
from node.export.exporter import Exporter
from node.export.sender import SendError
from node.runtime.config import load_settings
from tests.support.net import free_port
from tests.support.orthanc import Orthanc
from tests.support.synthetic_dicom import small_chest_copies

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    with Orthanc(tmp_path / "orthanc", dicomweb=True, users={"cxr": "s3cret"}) as pacs:
        yield pacs


def _exports(store: AuditStore, files: list[Path], destination: str) -> list[int]:
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    row = store.record_instance_received(
        ReceivedInstance(
            sop_instance_uid=f"1.2.3.{len(store.list_instances()) + 1}",
            sop_class_uid=str(ds.SOPClassUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            spool_path=str(files[0]),
        )
    )
    return [
        store.create_export(
            row.id,
            destination_ae=destination,
            kind="seg",
            file_path=str(f),
            sop_instance_uid=str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID),
        ).id
        for f in files
    ]


def test_delivered_by_stow_rs_and_read_back(orthanc: Orthanc, tmp_path: Path) -> None:
    settings = load_settings(None, storage={"data_dir": str(tmp_path / "var")})
    store = AuditStore.open(settings.database_url)
    store.add_ae("ORTHWEB", role="destination", url=orthanc.dicomweb_url, auth="basic", username="cxr", secret="s3cret")
    files = small_chest_copies(tmp_path / "results", 3)
    ids = _exports(store, files, "ORTHWEB")

    assert Exporter(settings, store).run_once() == 3
    assert [store.list_exports(state=ExportState.SENT)[i].id for i in range(3)] == ids
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    stored = {orthanc.get_json(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] for i in orthanc.instances()}
    assert stored == uids
    sent = orthanc.instance_file(orthanc.instances()[0])
    assert any(sent == f.read_bytes() for f in files), "the bytes arrive as stored"
    # The audit log never shows the secret.
    assert all("s3cret" not in str(e.detail) for e in store.list_events())


def test_wrong_credentials_are_dead_at_once_and_a_down_peer_is_retried(orthanc: Orthanc, tmp_path: Path) -> None:
    settings = load_settings(
        None, storage={"data_dir": str(tmp_path / "var")}, sender={"max_attempts": 3, "backoff_initial_s": 60}
    )
    store = AuditStore.open(settings.database_url)
    store.add_ae("BADPASS", role="destination", url=orthanc.dicomweb_url, auth="basic", username="cxr", secret="wrong")
    store.add_ae("DOWN", role="destination", url=f"http://127.0.0.1:{free_port()}/dicom-web", auth="bearer", secret="t")
    (bad,) = _exports(store, small_chest_copies(tmp_path / "a", 1), "BADPASS")
    (down,) = _exports(store, small_chest_copies(tmp_path / "b", 1), "DOWN")

    assert Exporter(settings, store).run_once() == 0
    rows = {e.id: e for e in store.list_exports()}
    assert rows[bad].state == ExportState.DEAD and "HTTP 401" in rows[bad].last_error
    assert rows[down].state == ExportState.PENDING and rows[down].next_attempt_at is not None
    assert "ConnectError" in rows[down].last_error
    assert orthanc.instances() == []


def test_client_maps_per_instance_answers(orthanc: Orthanc, tmp_path: Path) -> None:
    """Orthanc's own STOW-RS answer, per instance: one stored, one unreadable file never sent."""
    (good,) = small_chest_copies(tmp_path / "c", 1)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    dest = StowDestination("ORTHWEB", orthanc.dicomweb_url, "basic", "cxr", "s3cret")
    ok, unreadable = send_stow([good, junk], dest)
    assert ok.ok and ok.status == 0
    assert not unreadable.ok and not unreadable.retryable and unreadable.error is not None
    with pytest.raises(SendError) as err:
        send_stow([good], StowDestination("X", orthanc.url + "/no-such-root", "basic", "cxr", "s3cret"))
    assert not err.value.retryable and "HTTP 404" in err.value.reason


def test_echo_of_a_stow_destination_is_a_qido_search(orthanc: Orthanc, tmp_path: Path) -> None:
    """`cxrnode ae echo` / the console's test button: a QIDO-RS search with the destination's credentials."""
    from node.admin.ae import echo_ae
    from node.runtime.config import TLSConfig

    store = AuditStore.open(f"sqlite:///{tmp_path / 'audit.db'}")
    store.add_ae("GOOD", role="destination", url=orthanc.dicomweb_url, auth="basic", username="cxr", secret="s3cret")
    store.add_ae("BADPASS", role="destination", url=orthanc.dicomweb_url, auth="basic", username="cxr", secret="nope")
    store.add_ae("DOWN", role="destination", url=f"http://127.0.0.1:{free_port()}/dicom-web")
    results = {n: echo_ae(store, n, calling_ae="CXRNODE", tls=TLSConfig()) for n in ("GOOD", "BADPASS", "DOWN")}
    assert results["GOOD"].ok and results["GOOD"].protocol == "QIDO-RS" and results["GOOD"].detail == "success"
    assert not results["BADPASS"].ok and results["BADPASS"].status == 401 and "HTTP 401" in results["BADPASS"].detail
    assert not results["DOWN"].ok and results["DOWN"].status is None and "ConnectError" in results["DOWN"].detail
    echoes = store.list_events(kinds=["ae.echo"])
    assert [(e.detail["name"], e.detail["ok"]) for e in echoes] == [("GOOD", True), ("BADPASS", False), ("DOWN", False)]
    assert all("s3cret" not in str(e.detail) and "nope" not in str(e.detail) for e in echoes)
