"""node.export.sender against a pynetdicom Storage SCP that misbehaves on purpose: refuses with a status,
or aborts the association in the middle of a batch. Only what failed is sent again."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.export.sender import Destination, send
from node.results.common import DeviceInfo
from node.results.seg import build_seg
from node.results.sr import build_sr
from tests.support.exports import ExportHarness
from tests.support.net import free_port, wait_for
from tests.support.paths import shared_data
from tests.support.synthetic_results import synthetic_case

DICOM = shared_data() / "dicom"
DEFAULT_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


class ScriptedSCP:
    """Answers C-STOREs from a script: an int is the status to return, "abort" aborts the association."""

    def __init__(self, script: list[int | str], transfer_syntaxes: list[str] | None = None) -> None:
        self.script = script
        self.received: list[str] = []  # SOP Instance UIDs stored (status 0x0000)
        self.calls = 0
        self.port = free_port()
        ae = AE(ae_title="SCRIPTED")
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, transfer_syntaxes or DEFAULT_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        assert server is not None
        self.server = server

    def _store(self, event: evt.Event) -> int:
        action = self.script[self.calls] if self.calls < len(self.script) else 0x0000
        self.calls += 1
        if action == "abort":
            # From another thread: abort() joins the association's own thread, which runs this handler.
            threading.Thread(target=event.assoc.abort, daemon=True).start()
            wait_for(lambda: not event.assoc.is_established, 10, "the abort")  # no response can go out now
            return 0xC000
        if action == 0x0000:
            self.received.append(str(event.dataset.SOPInstanceUID))
        return int(action)

    @property
    def destination(self) -> Destination:
        return Destination("SCRIPTED", "127.0.0.1", self.port)


@pytest.fixture
def results() -> list[pydicom.Dataset]:
    case = synthetic_case(DICOM / "02_cr_implicit_le_12bit.dcm")
    seg = build_seg(case.source, case.full, case.result.models, device=DeviceInfo())
    sr = build_sr(case.source, seg, case.result, pixel_spacing_mm=None, device=DeviceInfo())
    seg2 = build_seg(case.source, case.full, case.result.models, device=DeviceInfo(), series_number=9101)
    return [seg, sr, seg2]


@pytest.fixture
def scp_factory() -> Iterator[type[ScriptedSCP]]:
    started: list[ScriptedSCP] = []

    class Tracked(ScriptedSCP):
        def __init__(self, script: list[int | str], transfer_syntaxes: list[str] | None = None) -> None:
            super().__init__(script, transfer_syntaxes)
            started.append(self)

    yield Tracked
    for scp in started:
        scp.server.shutdown()


def test_abort_mid_batch_then_only_the_rest_is_resent(
    results: list[pydicom.Dataset], tmp_path: Path, scp_factory: type[ScriptedSCP]
) -> None:
    scp = scp_factory([0x0000, "abort"])
    first, second, third = send(results, scp.destination, calling_ae="CXRNODE", timeout_s=10)
    assert first.ok and not second.ok and not third.ok
    assert second.retryable and third.retryable
    assert third.error is not None and "abort" in third.error

    scp2 = scp_factory([0x0000, "abort"])
    harness = ExportHarness(tmp_path / "node", scp2.destination, max_attempts=3, backoff_initial_s=0.01)
    ids = harness.register(_files(results, tmp_path))
    assert harness.run(3) == 2
    assert [(e.state, e.attempts) for e in harness.exports(ids)] == [("sent", 1), ("sent", 2), ("sent", 2)], (
        "the second attempt re-sends only the two that failed"
    )
    assert sorted(scp2.received) == sorted(str(ds.SOPInstanceUID) for ds in results)


def test_out_of_resources_is_retried_and_a_refusal_is_final(
    results: list[pydicom.Dataset], tmp_path: Path, scp_factory: type[ScriptedSCP]
) -> None:
    scp = scp_factory([0xA700])
    harness = ExportHarness(tmp_path / "retried", scp.destination, max_attempts=3, backoff_initial_s=0.01)
    (export_id,) = harness.register(_files(results[:1], tmp_path))
    assert harness.run(3) == 2
    assert [a.status for a in harness.attempts(export_id)] == [0xA700, 0x0000]

    refusing = scp_factory([0xA900])
    harness = ExportHarness(tmp_path / "refused", refusing.destination, max_attempts=3)
    (export_id,) = harness.register(_files(results[:1], tmp_path))
    assert harness.run(3) == 1, "0xA900 is not retried"
    (export,) = harness.exports([export_id])
    assert export.state == "dead" and "0xA900" in export.last_error


def _files(datasets: list[pydicom.Dataset], folder: Path) -> list[Path]:
    """The result objects as the node keeps them: one file each."""
    paths = []
    for ds in datasets:
        path = folder / f"{ds.Modality.lower()}-{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_warning_status_counts_as_stored(results: list[pydicom.Dataset], scp_factory: type[ScriptedSCP]) -> None:
    scp = scp_factory([0xB007])
    (status,) = send(results[:1], scp.destination, calling_ae="CXRNODE")
    assert status.ok and status.status == 0xB007 and status.error is None


def test_files_are_proposed_in_their_own_transfer_syntax(tmp_path: Path, scp_factory: type[ScriptedSCP]) -> None:
    """A source in JPEG 2000 goes as JPEG 2000 (no transcoding); the pynetdicom SCP accepts it."""
    scp = scp_factory([], [JPEG2000Lossless, ExplicitVRLittleEndian])
    j2k = DICOM / "17_cr_j2k_lossless_12bit.dcm"
    (status,) = send([j2k], scp.destination, calling_ae="CXRNODE")
    assert status.ok and scp.received == [pydicom.dcmread(j2k).SOPInstanceUID]
    plain = scp_factory([])  # Explicit/Implicit VR Little Endian only: the J2K file is refused, not transcoded
    (refused,) = send([j2k], plain.destination, calling_ae="CXRNODE")
    assert not refused.ok and refused.error is not None and "JPEG 2000" in refused.error
