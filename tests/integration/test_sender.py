"""node.export.sender against real peers: Orthanc (read back over REST) and DCMTK storescp, plus the faults
an export meets: destination down then up, wrong called AE, a SOP class/transfer syntax refused."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pydicom
import pytest

from node.export.sender import Destination, SendError, backoff_delay, send
from node.results.common import DeviceInfo
from node.results.overlay import build_overlay
from node.results.seg import build_seg
from node.results.sr import build_sr
from node.runtime.config import SenderConfig
from tests.support.dcmtk import StoreSCP
from tests.support.exports import ExportHarness
from tests.support.net import free_port, port_open, wait_for
from tests.support.orthanc import Orthanc
from tests.support.paths import shared_data
from tests.support.synthetic_results import synthetic_case

DICOM = shared_data() / "dicom"
CALLING = "CXRNODE"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """SEG, SR and overlay of a CR, written as the node writes them."""
    folder = tmp_path_factory.mktemp("results")
    case = synthetic_case(DICOM / "01_cr_explicit_le_mono2_12bit_2048x2500.dcm")
    device = DeviceInfo()
    seg = build_seg(case.source, case.full, case.result.models, device=device)
    sr = build_sr(
        case.source, seg, case.result, pixel_spacing_mm=case.prepared.prepared_pixel_spacing_mm, device=device
    )
    overlay = build_overlay(case.source, case.prepared.pixels, case.small, case.result.models, device=device)
    paths = []
    for name, obj in (("seg", seg), ("sr", sr), ("overlay", overlay)):
        path = folder / f"{name}.dcm"
        obj.save_as(path)
        paths.append(path)
    return paths


def _same_dataset(sent: Path, received: pydicom.Dataset) -> None:
    original = pydicom.dcmread(sent)
    assert received.SOPInstanceUID == original.SOPInstanceUID
    assert received.SOPClassUID == original.SOPClassUID
    for element in original:  # every attribute arrives unchanged (Orthanc/storescp may add, never alter)
        assert received[element.tag] == element, f"{sent.name}: {element.keyword or element.tag} differs"


def test_seg_sr_overlay_arrive_in_orthanc(results: list[Path], tmp_path: Path) -> None:
    with Orthanc(tmp_path / "orthanc") as pacs:
        statuses = send(results, Destination(pacs.ae_title, "127.0.0.1", pacs.dicom_port), calling_ae=CALLING)
        assert [s.status for s in statuses] == [0x0000] * 3 and all(s.ok for s in statuses)
        assert [s.path for s in statuses] == results
        received = {}
        for orthanc_id in pacs.instances():
            ds = pydicom.dcmread(io.BytesIO(pacs.instance_file(orthanc_id)))
            received[ds.SOPInstanceUID] = ds
        assert set(received) == {s.sop_instance_uid for s in statuses}
        for path in results:
            _same_dataset(path, received[pydicom.dcmread(path).SOPInstanceUID])
        seg = received[statuses[0].sop_instance_uid]
        assert seg.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


def test_datasets_to_storescp_on_one_association(results: list[Path], tmp_path: Path) -> None:
    """In-memory data sets go too; the whole batch uses one association (storescp logs each one)."""
    out, port = tmp_path / "out", free_port()
    out.mkdir()
    log_path = tmp_path / "storescp.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["storescp", "-v", "-aet", "DEST", "-od", str(out), str(port)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_for(lambda: port_open(port), 15, "storescp")
        datasets = [pydicom.dcmread(p) for p in results]
        statuses = send(datasets, Destination("DEST", "127.0.0.1", port), calling_ae=CALLING)
        assert all(s.ok for s in statuses) and all(s.path is None for s in statuses)
    finally:
        proc.terminate()
        proc.wait(10)
    assert log_path.read_text().count("Association Acknowledged") == 1  # the port probe is not acknowledged
    received = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in out.iterdir()}
    assert len(received) == 3
    for path in results:
        _same_dataset(path, received[pydicom.dcmread(path).SOPInstanceUID])


def test_refused_transfer_syntax_fails_that_object_only(results: list[Path], tmp_path: Path) -> None:
    """storescp accepts only uncompressed syntaxes by default: the JPEG source is refused, the SEG goes."""
    jpeg = DICOM / "13_cr_jpeg_extended_12bit.dcm"
    with StoreSCP(tmp_path / "out") as scp:
        seg, refused = send([results[0], jpeg], Destination(scp.ae_title, "127.0.0.1", scp.port), calling_ae=CALLING)
    assert seg.ok
    assert not refused.ok and refused.status is None and not refused.retryable
    assert refused.error is not None and "JPEG Extended" in refused.error


def test_wrong_called_ae_is_rejected_clearly(results: list[Path], tmp_path: Path) -> None:
    with Orthanc(tmp_path / "orthanc") as pacs:
        destination = Destination("NOTORTHANC", "127.0.0.1", pacs.dicom_port)
        with pytest.raises(SendError) as err:
            send(results, destination, calling_ae=CALLING)
        assert "rejected" in err.value.reason and "Called AE title not recognised" in err.value.reason
        assert not err.value.retryable
        harness = ExportHarness(tmp_path / "node", destination, max_attempts=4)
        ids = harness.register(results)
        # Dead at the first rejection seen, far from the attempt budget. (Orthanc closes the connection
        # right after its A-ASSOCIATE-RJ; now and then the close is read first and that attempt is an
        # abort, which may be transient and is tried once more.)
        passes = harness.run(4)
        exports = harness.exports(ids)
        assert passes <= 2 and all(e.state == "dead" and e.attempts == passes for e in exports)
        assert "Called AE title not recognised" in exports[0].last_error
        assert pacs.instances() == []


def test_destination_down_then_up_is_delivered_on_retry(results: list[Path], tmp_path: Path) -> None:
    """The exporter's retry: attempt 1 finds nobody, the retry after backoff_delay(1) delivers all three."""
    scp = StoreSCP(tmp_path / "out")
    destination = Destination(scp.ae_title, "127.0.0.1", scp.port)
    with pytest.raises(SendError, match="cannot connect") as err:
        send(results, destination, calling_ae=CALLING, timeout_s=5)
    assert err.value.retryable

    cfg = SenderConfig(max_attempts=3, backoff_initial_s=2.0, backoff_factor=3.0, backoff_max_s=60)
    harness = ExportHarness(tmp_path / "node", destination, **cfg.model_dump())
    ids = harness.register(results)
    try:
        passes = harness.run(3, between=lambda _n: scp.__enter__())
        assert passes == 2, [(e.state, e.attempts, e.last_error) for e in harness.exports(ids)]  # back for the retry
    finally:
        scp.__exit__()
    assert [(e.state, e.attempts, e.last_error) for e in harness.exports(ids)] == [("sent", 2, "")] * 3
    first, second = harness.attempts(ids[0])
    assert first.status is None and "cannot connect" in first.error and second.status == 0x0000
    assert harness.delays(ids[0]) == [backoff_delay(1, cfg)] == [2.0]
    assert sorted(p.name[:2] for p in (tmp_path / "out").iterdir()) == ["SC", "SG", "SR"]


def test_attempts_exhausted_is_dead(results: list[Path], tmp_path: Path) -> None:
    cfg = SenderConfig(max_attempts=3, backoff_initial_s=1.0, backoff_factor=2.0, backoff_max_s=1.5)
    harness = ExportHarness(tmp_path / "node", Destination("DOWN", "127.0.0.1", free_port()), **cfg.model_dump())
    (export_id,) = harness.register(results[:1])
    assert harness.run(5) == 3
    (export,) = harness.exports([export_id])
    assert (export.state, export.attempts) == ("dead", 3) and "cannot connect" in export.last_error
    assert harness.delays(export_id) == [1.0, 1.5]  # the last attempt schedules nothing


def test_unreadable_files_fail_alone_and_are_not_retried(results: list[Path], tmp_path: Path) -> None:
    """The DICOM test set's non-DICOM and empty files: each gets its own failure, the SEG still goes."""
    bad = [DICOM / "35_bad_not_dicom_random_bytes.dcm", DICOM / "36_bad_empty_file.dcm"]
    with StoreSCP(tmp_path / "out") as scp:
        destination = Destination(scp.ae_title, "127.0.0.1", scp.port)
        statuses = send([bad[0], results[0], bad[1]], destination, calling_ae=CALLING)
        assert [s.ok for s in statuses] == [False, True, False]
        assert all(
            s.error and s.error.startswith("cannot read object") and not s.retryable for s in (statuses[0], statuses[2])
        )
        harness = ExportHarness(tmp_path / "node", destination, max_attempts=3)
        ids = harness.register([results[1], bad[1]])
        assert harness.run(3) == 1, "nothing retryable"
        assert [e.state for e in harness.exports(ids)] == ["sent", "dead"]
        assert send([], destination, calling_ae=CALLING) == []
        assert send(bad, destination, calling_ae=CALLING)[0].status is None  # no association needed
