"""Same SOP Instance UID, other data set: a conflict, never a silent duplicate (issue 13, finding 7).

The first data set stored under a UID stays as it is. Another one under that UID (other study, other
bytes in the same transfer syntax) is answered 0x0111 with the reason, kept in quarantine and audited as
``instance.conflict``; a true copy, even in another transfer syntax or from another AE, stays a duplicate.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.audit import InstanceState
from tests.support.dcmtk import storescu
from tests.support.node import SENDER_AE, NodeProcess
from tests.support.synthetic_dicom import small_chest_copies

pytestmark = pytest.mark.timeout(180)


def variant(source: Path, out: Path, **changes: object) -> Path:
    ds = pydicom.dcmread(source)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_other_content_under_a_stored_uid_is_a_quarantined_conflict(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path, sources=(SENDER_AE, "MODALITY2")).start()
    (original,) = small_chest_copies(tmp_path / "src", 1)
    other_study = variant(original, tmp_path / "other_study.dcm", StudyInstanceUID=generate_uid())
    pixels = pydicom.dcmread(original).PixelData
    other_pixels = variant(original, tmp_path / "other_pixels.dcm", PixelData=bytes(reversed(pixels)))

    first = storescu(node.port, [original])
    assert first.statuses == [0x0000]
    stored = next(node.spool.glob("*/*.dcm"))
    stored_bytes = stored.read_bytes()

    assert storescu(node.port, [original]).statuses == [0x0000]  # a copy: duplicate
    assert storescu(node.port, [original], opts=["-xi"]).statuses == [0x0000]  # the copy in implicit VR
    assert storescu(node.port, [original], aet="MODALITY2").statuses == [0x0000]  # routed twice
    study = storescu(node.port, [other_study])
    assert study.statuses == [0x0111], study.output
    assert "ErrorComment" in study.output and "already stored as instance" in study.output
    assert storescu(node.port, [other_pixels]).statuses == [0x0111]

    store = node.store()
    rows = store.list_instances()
    live = [r for r in rows if r.state == InstanceState.QUEUED]
    assert len(live) == 1 and stored.read_bytes() == stored_bytes  # the first one is untouched
    assert [r.state for r in rows].count(InstanceState.DUPLICATE) == 3
    conflicts = [r for r in rows if r.state == InstanceState.REJECTED]
    assert len(conflicts) == 2 and all(r.duplicate_of_id == live[0].id for r in conflicts)
    assert "Study Instance UID" in conflicts[0].reason and "other content" in conflicts[1].reason
    for row in conflicts:  # both kept for review, with their reason
        assert Path(row.quarantine_path).exists()
        assert Path(row.quarantine_path).with_suffix(".reason.json").exists()
    events = store.list_events(kinds=["instance.conflict"])
    assert [e.detail["status"] for e in events] == ["0x0111", "0x0111"]
    assert all(e.detail["stored_instance_id"] == live[0].id for e in events)
    assert node.stop() == 0
    node.close()
