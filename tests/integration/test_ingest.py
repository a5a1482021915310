"""C-STORE ingest against a real `cxrnode serve` subprocess, with DCMTK and pynetdicom as the peers.

Every file of shared/data/dicom is sent and must get the answer manifest.csv gives it; every test runs
on SQLite and on a PostgreSQL server started by a fixture.
"""

from __future__ import annotations

import json
import re
import signal
import struct
import threading
from collections.abc import Callable
from itertools import groupby
from pathlib import Path

import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.audit import Association, InstanceFilter, InstanceState
from tests.support.dcmtk import StoreResult, echoscu, send_as_stored, storescu, storescu_opts
from tests.support.net import wait_for
from tests.support.node import NodeProcess
from tests.support.paths import dicom_dir, dicom_manifest
from tests.support.synthetic_dicom import small_chest_copies

pytestmark = pytest.mark.timeout(300)

MANIFEST = dicom_manifest()
SKIP_REASONS = {  # routing reasons an administrator sees for the files the chest models must not read
    "25": "not chest: BodyPartExamined HAND",
    "26": "modality CT not routed",
    "27": "lateral view LL",
    "37": "multi-frame CR not analysed",
}
# storescu converts big endian to little endian unless told to propose it; -xb keeps the bytes as stored.
EXTRA_OPTS = {"21": ["-xb"]}
RAW_SENDS = {"28", "30"}  # storescu cannot read these; pynetdicom sends their bytes as they are


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a DICOM file (after preamble + file meta), as sent on the wire."""
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        return data
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[144 + group_length :]


def sop_instance_uid(path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    return str(ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID)


def finished_associations(node: NodeProcess, count: int) -> list[Association]:
    """The associations once the last `count` have ended (the node records the end after the peer left)."""

    def ended() -> bool:
        rows = node.store().list_associations()
        return len(rows) >= count and all(a.result != "accepted" for a in rows)

    wait_for(ended, 15, "associations to end")
    return node.store().list_associations()


def status_allowed(row: dict[str, str], status: int) -> bool:
    """Does a status satisfy the manifest's expect_status (codes, 'or' lists and ranges)?"""
    text = row["expect_status"]
    for lo, hi in re.findall(r"0x([0-9A-Fa-f]{4})-0x([0-9A-Fa-f]{4})", text):
        if int(lo, 16) <= status <= int(hi, 16):
            return True
    codes = {int(c, 16) for c in re.findall(r"0x([0-9A-Fa-f]{4})", text)}
    if row["file"].startswith("37"):
        codes.add(0xA900)  # the manifest notes a strict SCP may refuse it
    return status in codes


def send_manifest_files(node: NodeProcess) -> dict[str, int | None]:
    """Send every sendable file as the manifest says; returns {file name: response status or None}."""
    statuses: dict[str, int | None] = {}
    plan = []
    for row in MANIFEST:
        prefix = row["file"][:2]
        opts = storescu_opts(row)
        if prefix in RAW_SENDS:
            statuses[row["file"]] = send_as_stored(node.port, dicom_dir() / row["file"])
        elif opts is not None:
            plan.append((tuple(opts + EXTRA_OPTS.get(prefix, [])), row["file"]))
    # One association per distinct set of options, as a PACS would send a batch.
    for opts, group in groupby(sorted(plan), key=lambda p: p[0]):
        files = [dicom_dir() / name for _, name in group]
        result = storescu(node.port, files, opts=list(opts))
        for f in files:
            statuses[f.name] = result.responses.get(sop_instance_uid(f))
    return statuses


def test_echo_and_association_policy(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(extra_toml="max_associations = 1").start()
    assert echoscu(node.port).returncode == 0

    unknown = echoscu(node.port, aet="INTRUDER")
    assert unknown.returncode != 0
    assert "Calling AE Title Not Recognized" in unknown.stdout + unknown.stderr
    wrong_called = echoscu(node.port, aec="SOMEONEELSE")
    assert wrong_called.returncode != 0
    assert "Called AE Title Not Recognized" in wrong_called.stdout + wrong_called.stderr

    rejected = [a for a in finished_associations(node, 3) if a.result == "rejected"]
    assert [(a.calling_ae, a.reason) for a in rejected] == [
        ("INTRUDER", "calling AE title not recognised: 'INTRUDER'"),
        ("STORESCU", "called AE title not recognised: 'SOMEONEELSE'"),
    ]
    assert all(a.peer_host == "127.0.0.1" and a.peer_port for a in rejected)
    assert any(a.result == "released" and a.calling_ae == "STORESCU" for a in node.store().list_associations())

    # dicom.max_associations: one association open, the next is rejected (transient) and audited.
    holder = AE(ae_title="STORESCU")
    holder.add_requested_context(Verification)
    held = holder.associate("127.0.0.1", node.port, ae_title="CXRNODE")
    assert held.is_established
    try:
        busy = echoscu(node.port)
        assert busy.returncode != 0 and "Local Limit Exceeded" in busy.stdout + busy.stderr
    finally:
        held.release()
    assert any(a.result == "rejected" and "max_associations" in a.reason for a in finished_associations(node, 5))
    assert echoscu(node.port).returncode == 0
    assert node.stop() == 0


def test_every_test_file_gets_its_manifest_answer(node: NodeProcess) -> None:
    statuses = send_manifest_files(node)
    store = node.store()

    for row in MANIFEST:
        name, prefix = row["file"], row["file"][:2]
        path = dicom_dir() / name
        if storescu_opts(row) is None and prefix not in RAW_SENDS:
            continue  # 34-36: checked in their own tests
        status = statuses[name]
        assert status is not None, f"{name}: no C-STORE response"
        assert status_allowed(row, status), f"{name}: status 0x{status:04X}, manifest says {row['expect_status']}"
        uid = sop_instance_uid(path)

        if row["expect"] == "accept":
            inst = store.find_live_instance(uid)
            assert inst is not None, name
            if row["analysable"] == "yes":
                assert inst.state == InstanceState.QUEUED, (name, inst.state, inst.reason)
                assert inst.queued_at is not None and inst.models and inst.destinations == ["reply-to-sender"]
            else:
                assert inst.state == InstanceState.SKIPPED, (name, inst.state)
                assert inst.reason.startswith(SKIP_REASONS[prefix]), (name, inst.reason)
            spooled = Path(inst.spool_path)
            assert spooled.is_relative_to(node.spool)
            assert dataset_bytes(spooled) == dataset_bytes(path), f"{name}: not stored as received"
            assert pydicom.dcmread(spooled, stop_before_pixels=True).SOPInstanceUID == uid
        else:
            rows = store.list_instances(InstanceFilter(sop_instance_uid=uid))
            assert [r.state for r in rows] == [InstanceState.REJECTED], name
            quarantined = Path(rows[0].quarantine_path)
            assert quarantined.parent == node.quarantine
            assert dataset_bytes(quarantined) == dataset_bytes(path), f"{name}: quarantine must keep the bytes"
            reason = json.loads(quarantined.with_suffix(".reason.json").read_text())
            assert reason["status"] == f"0x{status:04X}" and reason["reason"] == rows[0].reason
            assert reason["calling_ae"] == "STORESCU"
            events = store.list_events(kinds=["instance.rejected"], instance_id=rows[0].id)
            assert len(events) == 1 and events[0].detail["reason"] == rows[0].reason

    accepted = [r for r in MANIFEST if r["expect"] == "accept"]
    assert len(list(node.spool.glob("*/*.dcm"))) == len(accepted)
    assert not list((node.spool / ".incoming").iterdir())


def test_files_that_never_reach_the_handler(node: NodeProcess) -> None:
    """34: no presentation context for a made-up SOP class; 35/36: no sender can read them."""
    unknown_class = dicom_dir() / next(r["file"] for r in MANIFEST if r["file"].startswith("34"))
    result = storescu(node.port, [unknown_class])
    assert not result.responses and "No presentation context" in result.output
    (association,) = finished_associations(node, 1)
    assert association.calling_ae == "STORESCU" and association.result in ("released", "aborted")
    assert association.instances_stored == 0

    for row in (r for r in MANIFEST if r["file"][:2] in ("35", "36")):
        path = dicom_dir() / row["file"]
        result = storescu(node.port, [path])
        assert not result.responses and re.search(r"^[EWF]: ", result.output, re.MULTILINE), row["file"]
        with pytest.raises((InvalidDicomError, EOFError, ValueError, OSError)):
            send_as_stored(node.port, path)
    assert echoscu(node.port).returncode == 0, "the node is unaffected"
    assert node.store().list_instances() == []


def test_duplicate_is_acknowledged_recorded_and_not_processed_again(node: NodeProcess) -> None:
    path = dicom_dir() / next(r["file"] for r in MANIFEST if r["file"].startswith("09"))
    first, second = storescu(node.port, [path]), storescu(node.port, [path])
    assert first.statuses == [0x0000] and second.statuses == [0x0000]

    rows = node.store().list_instances(InstanceFilter(sop_instance_uid=sop_instance_uid(path)))
    assert [r.state for r in rows] == [InstanceState.QUEUED, InstanceState.DUPLICATE]
    assert rows[1].duplicate_of_id == rows[0].id and rows[1].spool_path == ""
    assert len(list(node.spool.glob("*/*.dcm"))) == 1
    assert len(node.store().list_events(kinds=["instance.queued"])) == 1
    assert len(node.store().list_events(kinds=["instance.duplicate"])) == 1
    second_assoc = finished_associations(node, 2)[-1]
    assert (second_assoc.instances_stored, second_assoc.instances_duplicate) == (0, 1)


def test_low_disk_rejects_storage_associations_before_any_data_set(node_factory: Callable[..., NodeProcess]) -> None:
    node = node_factory(min_free_mb=10**9).start()  # a petabyte free: never true
    path = dicom_dir() / next(r["file"] for r in MANIFEST if r["file"].startswith("09"))
    result = storescu(node.port, [path])
    assert result.returncode != 0 and result.statuses == []
    assert "Association Rejected" in result.output and "Transient" in result.output, result.output
    assert not list(node.spool.glob("*/*.dcm")) and node.store().list_instances() == []
    # The rejection is audited just after the A-ASSOCIATE-RJ went out.
    wait_for(lambda: len(node.store().list_associations()) == 1, 15, "the rejected association to be audited")
    (assoc,) = node.store().list_associations()
    assert assoc.result == "rejected" and "min_free_mb" in assoc.reason and assoc.peer_host == "127.0.0.1"
    assert echoscu(node.port).returncode == 0  # verification needs no disk: monitoring still sees the node
    assert node.stop() == 0


def test_sigterm_lets_the_association_in_flight_finish(node: NodeProcess, tmp_path: Path) -> None:
    files = small_chest_copies(tmp_path / "send", 60)
    out: list[StoreResult] = []
    sender = threading.Thread(target=lambda: out.append(storescu(node.port, files)))
    sender.start()
    wait_for(lambda: len(list(node.spool.glob("*/*.dcm"))) >= 5, 60, "the send to start")
    assert node.proc is not None
    node.proc.send_signal(signal.SIGTERM)
    sender.join(120)
    assert node.stop() == 0, node.log_text()[-3000:]
    assert len(out[0].responses) == len(files) and set(out[0].statuses) == {0x0000}
    assert len(node.store().list_instances(InstanceFilter(states=[InstanceState.QUEUED]))) == len(files)
    assert echoscu(node.port).returncode != 0, "a stopped node accepts nothing"


def test_uncompressed_ybr_full_422_is_accepted(node: NodeProcess, tmp_path: Path) -> None:
    # 4:2:2 Pixel Data is two thirds of Rows x Columns x 3 (issue 13, finding 9): valid, so stored.
    from node.analysis.prepare import prepare
    from tests.support.synthetic_dicom import ybr_full_422_copy

    path = ybr_full_422_copy(tmp_path / "ybr422.dcm")
    result = storescu(node.port, [path])
    assert result.statuses == [0x0000], result.output[-2000:]
    (inst,) = node.store().list_instances()
    assert inst.state in (InstanceState.QUEUED, InstanceState.SKIPPED) and inst.spool_path
    assert prepare(inst.spool_path).pixels.shape == (1024, 1024)


def test_trailing_pixel_padding_is_stored_with_a_warning(node: NodeProcess, tmp_path: Path) -> None:
    # Padding short of one frame is what some writers leave and readers ignore: stored and analysed,
    # answered 0xB007 with the reason; a whole frame more is a header that miscounts frames: refused.
    from node.analysis.prepare import prepare
    from tests.support.synthetic_dicom import padded_pixel_data_copy

    original = dicom_dir() / "07_cr_10bit_stored_16alloc.dcm"
    padded = padded_pixel_data_copy(original, tmp_path / "padded.dcm", 128)
    result = storescu(node.port, [padded])
    assert result.statuses == [0xB007], result.output[-2000:]
    assert "trailing padding" in result.output
    (inst,) = node.store().list_instances()
    assert inst.state == InstanceState.QUEUED, inst.reason
    (received,) = node.store().list_events(kinds=["instance.received"], instance_id=inst.id)
    assert received.detail["warning"] == "Pixel Data: 128 bytes of trailing padding ignored"
    assert (prepare(inst.spool_path).pixels == prepare(original).pixels).all(), "the padding must be ignored"

    source = pydicom.dcmread(original, stop_before_pixels=True)
    frame = int(source.Rows) * int(source.Columns) * 2
    extra_frame = padded_pixel_data_copy(original, tmp_path / "two_frames.dcm", frame)
    result = storescu(node.port, [extra_frame])
    assert result.statuses == [0xA900], result.output[-2000:]
    (refused,) = node.store().list_instances(InstanceFilter(states=[InstanceState.REJECTED]))
    assert dataset_bytes(Path(refused.quarantine_path)) == dataset_bytes(extra_frame)


def test_children_are_stored_and_not_analysed(node: NodeProcess, tmp_path: Path) -> None:
    # The built-in rules analyse adults and films without an age; a child's film is stored as any
    # other (0x0000, in the spool) and skipped with the reason, so the models never read it.
    from pydicom.uid import generate_uid

    source = pydicom.dcmread(dicom_dir() / "07_cr_10bit_stored_16alloc.dcm")
    ages = {"child": ("006Y", ""), "born-2019": ("", "20190301"), "adult": ("045Y", ""), "unknown": ("", "")}
    ages["no-study-date"] = ("", "20150101")  # Content Date (20240115 in the source) stands in
    files, uids = [], {}
    for name, (age, born) in ages.items():
        ds = source.copy()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uids[name] = generate_uid()
        ds.PatientAge, ds.PatientBirthDate = age, born
        ds.StudyDate = "" if name == "no-study-date" else "20240115"
        ds.ContentDate = "20240115"
        files.append(tmp_path / f"{name}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    result = storescu(node.port, files)
    assert result.statuses == [0x0000] * 5, result.output[-2000:]
    store = node.store()
    states = {name: store.find_live_instance(uid) for name, uid in uids.items()}
    assert all(i is not None and Path(i.spool_path).is_relative_to(node.spool) for i in states.values())
    assert states["child"].state == InstanceState.SKIPPED  # type: ignore[union-attr]
    assert states["child"].reason == "patient age 6 years, below the rule's minimum 18"  # type: ignore[union-attr]
    assert states["born-2019"].state == InstanceState.SKIPPED  # type: ignore[union-attr]
    assert states["born-2019"].reason.startswith("patient age 4.8 years")  # type: ignore[union-attr]
    assert states["no-study-date"].reason.startswith("patient age 9 years")  # type: ignore[union-attr]
    assert states["adult"].state == states["unknown"].state == InstanceState.QUEUED  # type: ignore[union-attr]


def test_a_mixed_folder_goes_in_one_documented_dcmsend_call(node: NodeProcess, tmp_path: Path) -> None:
    """README's advice for a folder of mixed transfer syntaxes (issue 17, finding 8): dcmsend proposes
    each file's own SOP class and transfer syntax; storescu -x.. takes one call per syntax."""
    import shutil
    import subprocess

    folder = tmp_path / "mixed"
    folder.mkdir()
    names = [
        row["file"]
        for row in dicom_manifest()
        if row["file"][:2] in {"12", "13", "14", "15", "16", "17", "18", "19", "20", "21", "22"}
    ]
    for name in names:
        shutil.copy(dicom_dir() / name, folder / name)
    proc = subprocess.run(
        ["dcmsend", "-aet", "STORESCU", "-aec", "CXRNODE", "127.0.0.1", str(node.port), "+sd", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stored = node.store().list_instances(InstanceFilter())
    assert len(stored) == len(names) == 11
    assert {r.state for r in stored} == {InstanceState.QUEUED}
