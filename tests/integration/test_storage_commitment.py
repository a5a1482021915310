"""Storage commitment, both roles, over real loopback associations.

SCU: the exporter sends results to a destination that takes commitment and asks it to commit them;
the report comes on the same association or on a new one to the node's SCP (a pynetdicom peer that
reports as told, and a real Orthanc). Failures and silence are sent again, then dead. SCP: a
pynetdicom sender asks the node to commit what it sent; the node answers from its store.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pydicom
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid
from pynetdicom import AE, _config, build_context, build_role, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.audit import AuditStore, ExportState, InstanceState, ReceivedInstance
from node.export import commitment
from node.export.exporter import Exporter
from node.ingest.accept import Ingest
from node.ingest.spool import Spool
from node.runtime import metrics
from node.runtime.config import Settings, load_settings
from node.runtime.serve import Listener
from tests.support.commitment_peer import STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, CommitmentPeer
from tests.support.dcmtk import StoreSCP
from tests.support.net import free_port, wait_for
from tests.support.node import NodeProcess
from tests.support.orthanc import Orthanc
from tests.support.paths import dicom_dir

NODE_AE = "CXRNODE"
RESULT_FILES = ("02_cr_implicit_le_12bit.dcm", "09_cr_8bit_alloc8.dcm")


def _settings(tmp: Path, database_url: str = "", **sender: object) -> Settings:
    return load_settings(
        None,
        dicom={"ae_title": NODE_AE, "host": "127.0.0.1", "port": free_port()},
        **({"database": {"url": database_url}} if database_url else {}),  # type: ignore[arg-type]
        storage={"data_dir": str(tmp / "var"), "min_free_mb": 1},
        sender={"max_attempts": 3, "backoff_initial_s": 0.0, "timeout_s": 10, "commitment_wait_s": 5.0, **sender},
        broker={"enabled": False},
        web={"enabled": False},
    )


@contextmanager
def _listening(settings: Settings, store: AuditStore) -> Iterator[Listener]:
    """The node's SCP in this process; pynetdicom's and tempfile's process-wide settings that it changes
    are put back afterwards, so the in-process peers of later tests receive normally."""
    spool = Spool(settings.storage.data_dir)
    spool.prepare()
    listener = Listener(settings, Ingest(settings, store, spool))
    listener.start()
    try:
        yield listener
    finally:
        listener.stop(1)
        _config.STORE_RECV_CHUNKED_DATASET = False
        tempfile.tempdir = None


@pytest.fixture
def node(tmp_path: Path, database_url: str) -> Iterator[tuple[Settings, AuditStore, Listener]]:
    """An in-process node: audit store (SQLite and PostgreSQL) and the SCP (reports on a new association
    come here)."""
    settings = _settings(tmp_path, database_url)
    store = AuditStore.open(settings.database_url)
    with _listening(settings, store) as listener:
        yield settings, store, listener
    store.close()


def _analyzed_with_exports(store: AuditStore, tmp: Path, destination: str) -> tuple[int, list[str]]:
    """An instance whose results (two real DICOM files) are due to `destination`; returns (id, SOP UIDs)."""
    inst = store.record_instance_received(
        ReceivedInstance(sop_instance_uid=generate_uid(), sop_class_uid="1.2.840.10008.5.1.4.1.1.1")
    )
    store.set_instance_state(inst.id, InstanceState.QUEUED)
    store.set_instance_state(inst.id, InstanceState.ANALYZED)
    uids = []
    for name in RESULT_FILES:
        ds = pydicom.dcmread(dicom_dir() / name)
        ds.SOPInstanceUID = generate_uid()  # a fresh result each time
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = tmp / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path)
        store.create_export(
            inst.id,
            destination_ae=destination,
            kind="seg",
            file_path=str(path),
            sop_instance_uid=str(ds.SOPInstanceUID),
        )
        uids.append(str(ds.SOPInstanceUID))
    return inst.id, uids


def _peer_ae(store: AuditStore, peer_port: int, name: str = "COMMITPACS") -> None:
    store.add_ae(name, host="127.0.0.1", port=peer_port, role="destination", storage_commitment=True)


def _metric(role: str, outcome: str) -> float:
    """cxrnode_storage_commitments_total{role, outcome} as /metrics exposes it (this process)."""
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "cxrnode_storage_commitments_total" and sample.labels == {
                "role": role,
                "outcome": outcome,
            }:
                return float(sample.value)
    return 0.0


def _states(store: AuditStore, instance_id: int) -> list[str]:
    return [e.state for e in store.list_exports(instance_id)]


# --- SCU ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["same", "new"])
def test_results_are_committed_on_either_association(
    node: tuple[Settings, AuditStore, Listener], tmp_path: Path, mode: str
) -> None:
    settings, store, listener = node
    committed_before = _metric("scu", "committed")
    peer = CommitmentPeer(mode=mode, node=(NODE_AE, "127.0.0.1", listener.port))  # type: ignore[arg-type]
    try:
        _peer_ae(store, peer.port)
        instance_id, uids = _analyzed_with_exports(store, tmp_path, "COMMITPACS")
        assert Exporter(settings, store).run_once() == 2
        wait_for(lambda: _states(store, instance_id) == ["committed", "committed"], 20, "the commitment")
    finally:
        peer.close()
    assert sorted(peer.stored) == sorted(uids) and len(peer.requests) == 1
    assert sorted(inst for _, inst in peer.requests[0].references) == sorted(uids)
    assert store.get_instance(instance_id).state == InstanceState.EXPORTED
    [row] = store.list_commitments()
    assert (row.state, row.transaction_uid, row.destination_ae) == (
        "committed",
        peer.requests[0].transaction_uid,
        "COMMITPACS",
    )
    [event] = store.list_events(kinds=["commitment.committed"])
    assert event.detail["via"] == ("same association" if mode == "same" else "new association")
    assert all(e.committed_at is not None and e.attempts == 1 for e in store.list_exports(instance_id))
    assert _metric("scu", "committed") == committed_before + 1  # /metrics counts it


def test_report_to_the_calling_ae_of_the_exporter_is_accepted(tmp_path: Path) -> None:
    """With sender.calling_ae set, the PACS reports to that AE title on the node's port."""
    settings = _settings(tmp_path, calling_ae="CXROUT")
    store = AuditStore.open(settings.database_url)
    with _listening(settings, store) as listener:
        peer = CommitmentPeer(mode="new", node=(NODE_AE, "127.0.0.1", listener.port))
        try:
            _peer_ae(store, peer.port)
            instance_id, _ = _analyzed_with_exports(store, tmp_path, "COMMITPACS")
            Exporter(settings, store).run_once()
            wait_for(lambda: _states(store, instance_id) == ["committed", "committed"], 20, "the commitment")
        finally:
            peer.close()
    assert peer.requests[0].calling_ae == "CXROUT" and peer.reports[0][1] == 0x0000
    store.close()


def test_cli_sets_the_switch_and_lists_committed_apart_from_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.cli.main import main

    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "var"}"\n[sender]\ncommitment_wait_s = 5\n')
    settings = load_settings(config)
    store = AuditStore.open(settings.database_url)
    peer = CommitmentPeer()
    cli = ["--config", str(config)]
    try:
        assert (
            main(
                [
                    "ae",
                    "add",
                    "COMMITPACS",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(peer.port),
                    "--role",
                    "destination",
                    "--storage-commitment",
                    *cli,
                ]
            )
            == 0
        )
        assert "added AE COMMITPACS (destination, 127.0.0.1:" in capsys.readouterr().out
        assert (
            main(
                [
                    "ae",
                    "add",
                    "PLAINPACS",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(peer.port),
                    "--role",
                    "destination",
                    *cli,
                ]
            )
            == 0
        )
        assert main(["ae", "add", "SOURCEONLY", "--role", "source", "--storage-commitment", *cli]) == 2
        assert "storage_commitment" in capsys.readouterr().err
        committed, _ = _analyzed_with_exports(store, tmp_path, "COMMITPACS")
        plain, _ = _analyzed_with_exports(store, tmp_path, "PLAINPACS")
        Exporter(settings, store).run_once()
    finally:
        peer.close()
    capsys.readouterr()
    assert main(["exports", "list", "--json", *cli]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)
    states = {(r["instance"], r["state"], r["committed_at"] is not None) for r in rows}
    assert states == {(committed, "committed", True), (plain, "sent", False)}
    assert main(["exports", "list", "--state", "committed", "--json", *cli]) == 0
    assert {r["instance"] for r in json.loads(capsys.readouterr().out)} == {committed}
    assert main(["ae", "list", "--json", *cli]) == 0
    flags = {a["name"]: a["storage_commitment"] for a in json.loads(capsys.readouterr().out)}
    assert flags == {"COMMITPACS": True, "PLAINPACS": False}
    store.close()


def test_failed_commitment_is_sent_again_then_dead(node: tuple[Settings, AuditStore, Listener], tmp_path: Path) -> None:
    settings, store, _ = node
    peer = CommitmentPeer()
    try:
        _peer_ae(store, peer.port)
        instance_id, uids = _analyzed_with_exports(store, tmp_path, "COMMITPACS")
        peer.fail = {uids[1]}
        exporter = Exporter(settings, store)
        exporter.run_once()
        exports = {e.sop_instance_uid: e for e in store.list_exports(instance_id)}
        assert exports[uids[0]].state == ExportState.COMMITTED
        assert exports[uids[1]].state == ExportState.PENDING
        assert exports[uids[1]].last_error == "storage commitment: 0x0112 no such object instance"
        for _ in range(2):  # attempts 2 and 3 (max_attempts): only the uncommitted result goes again
            exporter.run_once()
    finally:
        peer.close()
    assert peer.stored.count(uids[0]) == 1 and peer.stored.count(uids[1]) == 3
    exports = {e.sop_instance_uid: e for e in store.list_exports(instance_id)}
    assert (exports[uids[1]].state, exports[uids[1]].attempts) == (ExportState.DEAD, 3)
    inst = store.get_instance(instance_id)
    assert inst.state == InstanceState.DEAD and "no such object instance" in inst.reason
    assert [c.state for c in store.list_commitments()] == ["failed", "failed", "failed"]


def test_destination_without_commitment_support_is_dead_with_the_reason(tmp_path: Path) -> None:
    """storescp stores but has no Storage Commitment: the switch is wrong for it, and the dead letter says so."""
    settings = _settings(tmp_path, max_attempts=2)
    store = AuditStore.open(settings.database_url)
    with StoreSCP(tmp_path / "received") as scp:
        store.add_ae("DESTSCP", host="127.0.0.1", port=scp.port, role="destination", storage_commitment=True)
        instance_id, _ = _analyzed_with_exports(store, tmp_path, "DESTSCP")
        exporter = Exporter(settings, store)
        exporter.run_once()
        exporter.run_once()
        received = list((tmp_path / "received").iterdir())
    exports = store.list_exports(instance_id)
    assert [(e.state, e.attempts) for e in exports] == [("dead", 2), ("dead", 2)]
    assert exports[0].last_error == (
        "storage commitment: N-ACTION failed: DESTSCP does not accept Storage Commitment Push Model"
    )
    # Stored each time (storescp names files by SOP Instance UID): only the commitment is missing.
    assert len(received) == 2 and len(store.list_events(kinds=["export.sent"], instance_id=instance_id)) == 4
    assert store.get_instance(instance_id).state == InstanceState.DEAD
    store.close()


def test_no_report_expires_and_the_results_go_again(tmp_path: Path) -> None:
    settings = _settings(tmp_path, commitment_timeout_s=0.5, commitment_wait_s=4.0)
    store = AuditStore.open(settings.database_url)
    peer = CommitmentPeer(withhold=1)
    try:
        _peer_ae(store, peer.port)
        instance_id, uids = _analyzed_with_exports(store, tmp_path, "COMMITPACS")
        exporter = Exporter(settings, store)
        exporter.run_once()
        assert _states(store, instance_id) == ["committing", "committing"]
        wait_for(lambda: bool(store.overdue_commitments()), 10, "the commitment deadline")
        exporter.run_once()  # expires the first transaction, sends again, the peer reports this time
        wait_for(lambda: _states(store, instance_id) == ["committed", "committed"], 20, "the second commitment")
    finally:
        peer.close()
        store.close()
    assert sorted(peer.stored) == sorted(uids * 2) and len(peer.requests) == 2
    assert [c.state for c in store.list_commitments()] == ["committed", "expired"]  # newest first
    assert "no N-EVENT-REPORT within 0.5 s" in store.list_commitments()[1].reason


def test_orthanc_commits_what_it_stored(node: tuple[Settings, AuditStore, Listener], tmp_path: Path) -> None:
    settings, store, listener = node
    with Orthanc(tmp_path / "orthanc", modalities={"node": (NODE_AE, "127.0.0.1", listener.port)}) as pacs:
        store.add_ae("ORTHANC", host="127.0.0.1", port=pacs.dicom_port, role="both", storage_commitment=True)
        instance_id, uids = _analyzed_with_exports(store, tmp_path, "ORTHANC")
        Exporter(settings, store).run_once()
        wait_for(lambda: _states(store, instance_id) == ["committed", "committed"], 30, "Orthanc's report")
        stored = {pacs.get_json(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in pacs.instances()}
    assert stored == set(uids)
    assert store.get_instance(instance_id).state == InstanceState.EXPORTED
    [event] = store.list_events(kinds=["commitment.committed"])
    assert event.detail["via"] == "new association" and event.detail["committed"] == 2


def test_reports_for_unknown_transactions_are_audited_only(node: tuple[Settings, AuditStore, Listener]) -> None:
    _settings, store, listener = node
    store.add_ae("COMMITPACS", host="127.0.0.1", port=free_port(), role="destination", storage_commitment=True)
    ae = AE(ae_title="COMMITPACS")
    ae.add_requested_context(STORAGE_COMMITMENT)
    assoc = ae.associate(
        "127.0.0.1", listener.port, ae_title=NODE_AE, ext_neg=[build_role(STORAGE_COMMITMENT, scp_role=True)]
    )
    assert assoc.is_established  # a destination-only AE may open an association for reports
    ds = Dataset()
    ds.TransactionUID = generate_uid()
    rsp, _ = assoc.send_n_event_report(ds, 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)
    assert rsp.Status == 0x0000
    no_uid = Dataset()
    no_uid.ReferencedSOPSequence = DicomSequence([])
    rsp, _ = assoc.send_n_event_report(no_uid, 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE, msg_id=2)
    assert rsp.Status == commitment.INVALID_ARGUMENT_VALUE and "Transaction UID" in rsp.ErrorComment
    assoc.release()
    assert [e.kind for e in store.list_events(kinds=["commitment.unknown_report", "commitment.bad_report"])] == [
        "commitment.unknown_report",
        "commitment.bad_report",
    ]


def test_destination_only_ae_cannot_store(node: tuple[Settings, AuditStore, Listener]) -> None:
    _, store, listener = node
    store.add_ae("COMMITPACS", host="127.0.0.1", port=free_port(), role="destination")
    ae = AE(ae_title="COMMITPACS")
    ae.add_requested_context(STORAGE_COMMITMENT)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1")
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=NODE_AE)
    assert assoc.is_rejected


# --- SCP ---------------------------------------------------------------------------------------------


def _store_and_request(
    port: int,
    files: list[Path],
    extra: list[tuple[str, str]],
    *,
    wait_report: bool,
    scp_port: int | None = None,
    scp_late: bool = False,
    report_timeout: float = 20,
) -> tuple[str, int, list[Dataset]]:
    """A pynetdicom sender: C-STORE `files`, ask to commit them and `extra`; returns (transaction UID,
    N-ACTION status, reports received on this association or on its own SCP at `scp_port`). `scp_late`:
    the first connection to that port is closed at once, and only then does its SCP start."""
    reports: list[Dataset] = []
    got = threading.Event()
    servers: list[Any] = []

    def on_report(event: evt.Event) -> tuple[int, None]:
        reports.append(event.event_information)  # type: ignore[attr-defined]
        got.set()
        return 0x0000, None

    def start_scp() -> None:
        scp = AE(ae_title="MODALITY")
        scp.add_supported_context(STORAGE_COMMITMENT, scu_role=True, scp_role=True)
        servers.append(
            scp.start_server(
                ("127.0.0.1", cast(int, scp_port)), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)]
            )
        )

    def refuse_once_then_start(listening: socket.socket) -> None:
        conn, _ = listening.accept()
        conn.close()
        listening.close()
        start_scp()

    if scp_port is not None and scp_late:
        listening = socket.create_server(("127.0.0.1", scp_port))
        threading.Thread(target=refuse_once_then_start, args=(listening,), daemon=True).start()
    elif scp_port is not None:
        start_scp()
    ae = AE(ae_title="MODALITY")
    datasets = [pydicom.dcmread(f) for f in files]
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    ae.requested_contexts = [*ae.requested_contexts, build_context(STORAGE_COMMITMENT), build_context(Verification)]
    # A requester that takes the SCP role asks for the report on a new association (PS3.4 J.3.3).
    roles = [build_role(STORAGE_COMMITMENT, scu_role=True, scp_role=True)] if scp_port is not None else []
    assoc = ae.associate(
        "127.0.0.1", port, ae_title=NODE_AE, ext_neg=roles, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)]
    )
    assert assoc.is_established
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0x0000
    tx = generate_uid()
    request = Dataset()
    request.TransactionUID = tx
    items = []
    for cls, inst in [(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in datasets] + extra:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, inst
        items.append(item)
    request.ReferencedSOPSequence = DicomSequence(items)
    rsp, _ = assoc.send_n_action(request, 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)
    if wait_report:
        got.wait(report_timeout)
    assoc.release()
    if not wait_report:
        got.wait(report_timeout)
    for server in servers:
        server.shutdown()
    return tx, int(rsp.Status), reports


def _sender_node(tmp_path: Path, scp_port: int | None = None) -> tuple[Settings, AuditStore]:
    settings = _settings(tmp_path)
    store = AuditStore.open(settings.database_url)
    store.add_ae("MODALITY", host="127.0.0.1", port=scp_port, role="source")
    return settings, store


def test_node_commits_what_it_stored_on_the_same_association(tmp_path: Path) -> None:
    settings, store = _sender_node(tmp_path)
    files = [tmp_path / n for n in RESULT_FILES]
    for name, dst in zip(RESULT_FILES, files, strict=True):
        shutil.copy(dicom_dir() / name, dst)
    never_sent = ("1.2.840.10008.5.1.4.1.1.1", generate_uid())
    stored = pydicom.dcmread(files[0], stop_before_pixels=True)
    wrong_class = ("1.2.840.10008.5.1.4.1.1.7", str(stored.SOPInstanceUID))
    with _listening(settings, store) as listener:
        tx, status, reports = _store_and_request(listener.port, files, [never_sent, wrong_class], wait_report=True)
    assert status == 0x0000
    [report] = reports
    assert report.TransactionUID == tx
    assert sorted(i.ReferencedSOPInstanceUID for i in report.ReferencedSOPSequence) == sorted(
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files
    )
    failed = {
        (i.ReferencedSOPInstanceUID, i.ReferencedSOPClassUID): int(i.FailureReason) for i in report.FailedSOPSequence
    }
    assert failed == {(never_sent[1], never_sent[0]): 0x0112, (wrong_class[1], wrong_class[0]): 0x0119}
    [received] = store.list_events(kinds=["commitment.request_received"])
    assert (received.detail["committed"], received.detail["failed"]) == (2, 2)
    wait_for(lambda: bool(store.list_events(kinds=["commitment.answered"])), 10, "the answer's audit row")
    assert store.list_events(kinds=["commitment.answered"])[0].detail["via"] == "same association"
    store.close()


def test_node_reports_on_a_new_association_when_the_requester_asks(tmp_path: Path) -> None:
    scp_port = free_port()
    settings, store = _sender_node(tmp_path, scp_port)
    files = [tmp_path / RESULT_FILES[0]]
    shutil.copy(dicom_dir() / RESULT_FILES[0], files[0])
    with _listening(settings, store) as listener:
        tx, status, reports = _store_and_request(listener.port, files, [], wait_report=False, scp_port=scp_port)
    assert status == 0x0000
    [report] = reports
    assert report.TransactionUID == tx and "FailedSOPSequence" not in report
    wait_for(lambda: bool(store.list_events(kinds=["commitment.answered"])), 10, "the answer's audit row")
    [answered] = store.list_events(kinds=["commitment.answered"])
    assert answered.detail["committed"] == 1
    store.close()


def test_orthanc_asks_the_node_to_commit(node: tuple[Settings, AuditStore, Listener], tmp_path: Path) -> None:
    """Orthanc as the requester (its REST API drives its SCU): it sends an instance to the node, then
    asks to commit it and one the node never got; the node reports on a new association."""
    _, store, listener = node
    with Orthanc(tmp_path / "orthanc", modalities={"node": (NODE_AE, "127.0.0.1", listener.port)}) as pacs:
        store.add_ae("ORTHANC", host="127.0.0.1", port=pacs.dicom_port, role="both")
        source = dicom_dir() / RESULT_FILES[0]
        uploaded = pacs.post_json("/instances", source.read_bytes())
        assert (
            pacs.post_json("/modalities/node/store", {"Resources": [uploaded["ID"]], "Synchronous": True})[
                "FailedInstancesCount"
            ]
            == 0
        )
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        never_sent = ["1.2.840.10008.5.1.4.1.1.1", generate_uid()]
        job = pacs.post_json(
            "/modalities/node/storage-commitment",
            {"DicomInstances": [[str(ds.SOPClassUID), str(ds.SOPInstanceUID)], never_sent], "Timeout": 20},
        )

        def answered() -> bool:
            return bool(pacs.get_json(job["Path"])["Status"] != "Pending")

        wait_for(answered, 30, "Orthanc to get the node's report")
        result = pacs.get_json(job["Path"])
    assert result["Status"] == "Failure"  # Orthanc's word for "not every instance committed"
    assert [i["SOPInstanceUID"] for i in result["Success"]] == [str(ds.SOPInstanceUID)]
    assert [(f["SOPInstanceUID"], f["FailureReason"]) for f in result["Failures"]] == [(never_sent[1], 0x0112)]
    [answer] = store.list_events(kinds=["commitment.answered"])
    assert (answer.detail["requester"], answer.detail["committed"], answer.detail["failed"]) == ("ORTHANC", 1, 1)


def test_report_is_tried_again_when_the_requester_is_busy(tmp_path: Path) -> None:
    """The requester's SCP drops the node's first association; the report goes on the next try."""
    scp_port = free_port()
    settings, store = _sender_node(tmp_path, scp_port)
    files = [tmp_path / RESULT_FILES[0]]
    shutil.copy(dicom_dir() / RESULT_FILES[0], files[0])
    with _listening(settings, store) as listener:
        tx, status, reports = _store_and_request(
            listener.port, files, [], wait_report=False, scp_port=scp_port, scp_late=True
        )
    assert status == 0x0000 and [r.TransactionUID for r in reports] == [tx]
    wait_for(lambda: bool(store.list_events(kinds=["commitment.answered"])), 10, "the answer's audit row")
    outbound = [a for a in store.list_associations() if a.direction == "outbound"]
    assert [a.result for a in outbound] == ["failed", "released"]  # newest last
    store.close()


def test_report_to_a_requester_without_address_is_audited(tmp_path: Path) -> None:
    """A requester that asks for a new association but has no host/port in the AE table: audited, no hang."""
    settings, store = _sender_node(tmp_path)  # MODALITY: a source without host and port
    files = [tmp_path / RESULT_FILES[0]]
    shutil.copy(dicom_dir() / RESULT_FILES[0], files[0])
    unused = free_port()
    with _listening(settings, store) as listener:
        # It proposes the SCP role (asks for a new association) but the node has nowhere to send it.
        _, status, reports = _store_and_request(
            listener.port, files, [], wait_report=False, scp_port=unused, report_timeout=1
        )
        wait_for(lambda: bool(store.list_events(kinds=["commitment.report_failed"])), 10, "the failure's audit row")
    assert status == 0x0000 and reports == []
    [failed] = store.list_events(kinds=["commitment.report_failed"])
    assert failed.detail["error"] == "requester has no address: 'MODALITY' is not a known AE with host and port"
    store.close()


def test_malformed_commitment_request_gets_a_reason(node: tuple[Settings, AuditStore, Listener]) -> None:
    _, store, listener = node
    store.add_ae("MODALITY", host="127.0.0.1", role="source")
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(STORAGE_COMMITMENT)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=NODE_AE)
    assert assoc.is_established
    no_uid = Dataset()
    no_uid.ReferencedSOPSequence = DicomSequence([])
    rsp, _ = assoc.send_n_action(no_uid, 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)
    assoc.release()
    assert rsp.Status == commitment.INVALID_ARGUMENT_VALUE and "Transaction UID" in rsp.ErrorComment
    [event] = store.list_events(kinds=["commitment.bad_request"])
    assert event.detail["requester"] == "MODALITY"


# --- acceptance: the node dies between send and report ------------------------------------------------


@pytest.mark.parametrize(("mode", "listeners"), [("same", 1), ("new", 2)])
def test_node_killed_before_the_report_sends_and_commits_once_after_restart(
    tmp_path: Path, mode: str, listeners: int
) -> None:
    """The peer stores the results and takes the N-ACTION but withholds its first report; the node is
    killed (SIGKILL) while it waits. After the restart the persisted transaction expires, the results
    go again, and this time they are committed: each result sent twice, committed once. The second
    report comes on the same association, or on a new one to one of two listener processes."""
    (tmp_path / "node").mkdir()
    node = NodeProcess(
        tmp_path / "node",
        extra_toml=(
            f"listeners = {listeners}\n"
            "[broker]\nembedded_worker = false\n"
            "[sender]\ncommitment_timeout_s = 3\ncommitment_wait_s = 60\nbackoff_initial_s = 0.5\n"
        ),
    )
    peer = CommitmentPeer(withhold=1, mode=mode, node=(NODE_AE, "127.0.0.1", node.port))  # type: ignore[arg-type]
    try:
        node.start()
        store = node.store()
        _peer_ae(store, peer.port)
        instance_id, uids = _analyzed_with_exports(store, tmp_path, "COMMITPACS")
        assert peer.got_request.wait(60), "the node never asked for commitment"
        # Sent, asked, no report yet: the transaction is in the audit log before the node dies.
        wait_for(lambda: bool(store.list_events(kinds=["commitment.requested"])), 10, "the N-ACTION's audit row")
        assert _states(store, instance_id) == ["committing", "committing"]
        [pending] = store.list_commitments()
        assert pending.state == "pending" and {r["sop_instance_uid"] for r in pending.sop_references} == set(uids)
        node.kill9()

        node.start()
        wait_for(lambda: _states(store, instance_id) == ["committed", "committed"], 60, "the commitment after restart")
        node.stop()
    finally:
        node.close()
        peer.close()
    assert sorted(peer.stored) == sorted(uids * 2) and len(peer.requests) == 2
    assert [c.state for c in store.list_commitments()] == ["committed", "expired"]
    assert [e.attempts for e in store.list_exports(instance_id)] == [2, 2]
    committed = store.list_events(kinds=["export.committed"], instance_id=instance_id)
    assert sorted(e.detail["export_id"] for e in committed) == sorted(e.id for e in store.list_exports(instance_id))
    assert store.get_instance(instance_id).state == InstanceState.EXPORTED
    [report] = store.list_events(kinds=["commitment.committed"])
    assert report.detail["via"] == f"{mode} association"
