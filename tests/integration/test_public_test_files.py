"""pydicom's own test files (installed with pydicom) sent to a real node, one association each.

These are files from many writers that the shared test set does not have: MR, CT, US, RT, SEG and SR,
big endian, deflated, RLE, JPEG, JPEG-LS and JPEG 2000, palette and YBR colour, multi-frame, padded and
truncated Pixel Data, files sharing one SOP Instance UID with other content. Whatever the node
answers, nothing is lost: a success or warning leaves the instance in the spool, any other answer leaves
its bytes in quarantine, each with its audit row, and the node keeps running without a traceback.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.audit import InstanceFilter, InstanceState
from tests.support.dcmtk import send_as_stored
from tests.support.node import NodeProcess

pytestmark = pytest.mark.timeout(300)

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
STORED = (0x0000, 0xB007)
# Every status the node may answer a data set with (docs/conformance.md 3.3).
ANSWERS = {0x0000, 0xB007, 0x0110, 0x0111, 0xA700, 0xA900, 0xC000}


def sendable(path: Path) -> Dataset | None:
    """The data set of a file that can be sent as stored (file meta naming its SOP class and transfer
    syntax, and the data set its UIDs), or None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the point of many of these files is a bad value
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 — DICOMDIRs, JSON, dumps: not data sets to send
            return None
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta or "MediaStorageSOPClassUID" not in meta:
        return None
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        return None
    if ds.SOPClassUID == "1.2.840.10008.1.3.10":  # Media Storage Directory: not sent over the network
        return None
    return ds


def send(port: int, path: Path) -> int | None:
    """C-STORE of the file's bytes as they are on a new association; the status, or None when none came
    (pynetdicom gives up on an association whose only context the node rejected: retired SOP classes)."""
    try:
        return send_as_stored(port, path)
    except RuntimeError:  # association not established
        return None


def test_pydicom_test_files_are_answered_and_nothing_is_lost(node: NodeProcess, tmp_path: Path) -> None:
    answered: dict[str, list[tuple[str, int]]] = {}
    for path in sorted(p for p in TEST_FILES.rglob("*") if p.is_file()):
        ds = sendable(path)
        if ds is None:
            continue
        status = send(node.port, path)
        assert node.proc is not None and node.proc.poll() is None, f"the node died on {path.name}"
        if status is not None:
            # The command's Affected SOP Instance UID comes from the file meta, and so does the audit row
            # of a data set refused for a different one of its own.
            answered.setdefault(str(ds.file_meta.MediaStorageSOPInstanceUID), []).append((path.name, status))

    sent = sum(len(v) for v in answered.values())
    assert sent >= 100, f"only {sent} of pydicom's test files were answered"
    store = node.store()
    for uid, answers in answered.items():
        rows = store.list_instances(InstanceFilter(sop_instance_uid=uid))
        for name, status in answers:
            assert status in ANSWERS, (name, hex(status))
        stored = [s for _, s in answers if s in STORED]
        live = [r for r in rows if r.state not in (InstanceState.REJECTED, InstanceState.DUPLICATE)]
        assert len(live) == (1 if stored else 0), (answers, [(r.state, r.reason) for r in rows])
        if live:
            assert Path(live[0].spool_path).is_file()
        quarantined = [r for r in rows if r.state == InstanceState.REJECTED]
        refused = [s for _, s in answers if s not in STORED and s != 0xA700]
        assert len(quarantined) == len(refused), (answers, [(r.state, r.reason) for r in rows])
        assert all(Path(r.quarantine_path).is_file() and r.reason for r in quarantined)

    statuses = {name: status for v in answered.values() for name, status in v}
    assert statuses["CT_small.dcm"] == 0x0000
    assert statuses["MR_truncated.dcm"] == 0xC000  # the file ends inside its Pixel Data
    assert statuses["MR_small_padded.dcm"] == 0x0111  # MR_small.dcm's UID, other content: stored one kept
    padded = sendable(TEST_FILES / "MR_small_padded.dcm")
    assert padded is not None
    padded.SOPInstanceUID = padded.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    padded.save_as(tmp_path / "padded.dcm", enforce_file_format=True)
    assert send(node.port, tmp_path / "padded.dcm") == 0xB007  # its own UID: trailing padding, a warning
    assert "Traceback" not in node.log_text()
