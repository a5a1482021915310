"""STOW-RS ingest against a real `cxrnode serve`, with dicomweb-client (PyPI) as the peer.

Every file of shared/data/dicom goes in by STOW-RS and must get the outcome manifest.csv gives it, mapped
to STOW-RS: accepted files are in ReferencedSOPSequence and stored/routed exactly as by C-STORE; refused
ones are in FailedSOPSequence with the C-STORE status the manifest expects as FailureReason, quarantined and
audited. Bad requests get their HTTP status, a reason and a rejected audit row, and leave nothing behind.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import add_certs_to_session, create_session
from pydicom.dataset import Dataset

from node.audit import Association, InstanceFilter, InstanceState
from tests.integration.test_ingest import SKIP_REASONS, dataset_bytes, sop_instance_uid, status_allowed
from tests.support.net import free_port, wait_for
from tests.support.node import NodeProcess
from tests.support.paths import dicom_dir, dicom_manifest
from tests.support.stow import SOURCE, add_token, client, post_files, start_stow_node, stow_toml
from tests.support.synthetic_dicom import padded_pixel_data_copy, small_chest_copies
from tests.support.tls import self_signed

pytestmark = pytest.mark.timeout(300)

MANIFEST = dicom_manifest()
MULTIPART = 'multipart/related; type="application/dicom"; boundary=XyZ'


def _body(*parts: bytes, boundary: str = "XyZ") -> bytes:
    out = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    return out + f"--{boundary}--\r\n".encode()


def _uid(path: Path) -> str:
    try:
        return sop_instance_uid(path)
    except Exception:  # noqa: BLE001 — random bytes, empty file
        return ""


def stow_associations(node: NodeProcess) -> list[Association]:
    return [a for a in node.store().list_associations() if a.protocol == "stow-rs"]


def test_every_test_file_by_stow_gets_its_manifest_answer(node_factory: Callable[..., NodeProcess]) -> None:
    node, port = start_stow_node(node_factory)
    token = add_token(node)
    files = [dicom_dir() / row["file"] for row in MANIFEST]
    answer = post_files(client(port, token), files)  # one request with all 37: some fail -> 202

    stored = {str(i.ReferencedSOPInstanceUID) for i in answer.get("ReferencedSOPSequence", [])}
    failed = [
        (str(i.get("ReferencedSOPInstanceUID", "")), int(i.FailureReason)) for i in answer.get("FailedSOPSequence", [])
    ]
    accepted = [r for r in MANIFEST if r["expect"] == "accept"]
    assert len(stored) == len(accepted) and len(failed) == len(MANIFEST) - len(accepted)
    by_uid = dict(failed)
    uidless = [reason for uid, reason in failed if not uid]
    store = node.store()
    for row in MANIFEST:
        name, prefix, path = row["file"], row["file"][:2], dicom_dir() / row["file"]
        uid = _uid(path)
        if row["expect"] == "accept":
            assert uid in stored, name
            inst = store.find_live_instance(uid)
            assert inst is not None and inst.calling_ae == SOURCE, name
            if row["analysable"] == "yes":
                assert inst.state == InstanceState.QUEUED and inst.destinations == ["reply-to-sender"], name
            else:
                assert inst.state == InstanceState.SKIPPED and inst.reason.startswith(SKIP_REASONS[prefix]), name
            assert dataset_bytes(Path(inst.spool_path)) == dataset_bytes(path), f"{name}: not stored as received"
            assert pydicom.dcmread(inst.spool_path, stop_before_pixels=True).SOPInstanceUID == uid
            continue
        # Refused: the status C-STORE would get (34: 0x0122, what a negotiated context would have answered).
        if prefix == "34":
            assert by_uid[uid] == 0x0122, name
            continue
        reason = by_uid[uid] if uid and uid in by_uid else uidless.pop()
        assert status_allowed(row, reason) or (prefix == "36" and reason in (0xA900, 0xC000)), (
            f"{name}: FailureReason 0x{reason:04X}, manifest says {row['expect_status']}"
        )
    assert not uidless
    rejected = store.list_instances(InstanceFilter(states=[InstanceState.REJECTED]))
    assert len(rejected) == len(failed) and all(r.calling_ae == SOURCE for r in rejected)
    for r in rejected:  # bytes kept in quarantine with the reason, as for C-STORE
        reason = json.loads(Path(r.quarantine_path).with_suffix(".reason.json").read_text())
        assert reason["reason"] == r.reason and reason["calling_ae"] == SOURCE
    assert len(list(node.spool.glob("*/*.dcm"))) == len(accepted)
    assert not list((node.spool / ".incoming").iterdir())
    (assoc,) = stow_associations(node)
    assert (assoc.result, assoc.calling_ae, assoc.instances_stored, assoc.instances_failed) == (
        "released",
        SOURCE,
        len(accepted),
        len(failed),
    )
    assert node.stop() == 0


@pytest.fixture
def stow(node_factory: Callable[..., NodeProcess]) -> Iterator[tuple[NodeProcess, int, str]]:
    node, port = start_stow_node(node_factory, max_request_mb=1)
    yield node, port, add_token(node)
    assert node.stop() == 0, node.log_text()[-3000:]


def test_public_client_api_study_path_duplicates_and_xml(stow: tuple[NodeProcess, int, str], tmp_path: Path) -> None:
    node, port, token = stow
    a, b, c = small_chest_copies(tmp_path / "in", 3, per_study=2)  # a, b in one study, c in another
    study = str(pydicom.dcmread(a).StudyInstanceUID)
    dw = client(port, token)
    answer = dw.store_instances([pydicom.dcmread(a), pydicom.dcmread(b)], study_instance_uid=study)
    assert len(answer.ReferencedSOPSequence) == 2 and "FailedSOPSequence" not in answer

    # The same instance again is a duplicate: success, recorded, not analysed twice.
    again = dw.store_instances([pydicom.dcmread(a)])
    assert [str(i.ReferencedSOPInstanceUID) for i in again.ReferencedSOPSequence] == [sop_instance_uid(a)]
    assert [r.state for r in node.store().list_instances(InstanceFilter(sop_instance_uid=sop_instance_uid(a)))] == [
        InstanceState.QUEUED,
        InstanceState.DUPLICATE,
    ]

    # POST to /studies/{uid} with an instance of another study: 409, FailureReason 0xA900, quarantined.
    with pytest.raises(requests.HTTPError) as err:
        post_files(dw, [c], study=study)
    assert err.value.response.status_code == 409
    failed = Dataset.from_json(err.value.response.json()).FailedSOPSequence
    assert failed[0].FailureReason == 0xA900 and failed[0].ReferencedSOPInstanceUID == sop_instance_uid(c)
    (row,) = node.store().list_instances(InstanceFilter(sop_instance_uid=sop_instance_uid(c)))
    assert row.state == InstanceState.REJECTED and "is not the study" in row.reason

    # Accept: application/dicom+xml -> the Native DICOM Model.
    rsp = httpx.post(
        f"http://127.0.0.1:{port}/dicomweb/studies",
        content=_body(c.read_bytes()),
        headers={"Content-Type": MULTIPART, "Authorization": f"Bearer {token}", "Accept": "application/dicom+xml"},
    )
    assert rsp.status_code == 200 and rsp.headers["content-type"] == "application/dicom+xml"
    assert b'keyword="ReferencedSOPSequence"' in rsp.content and sop_instance_uid(c).encode() in rsp.content


def _post(
    port: int,
    body: bytes | Iterator[bytes],
    *,
    token: str | None,
    content_type: str = MULTIPART,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    h = {"Content-Type": content_type, **(headers or {})}
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    return httpx.post(f"http://127.0.0.1:{port}/dicomweb/studies", content=body, headers=h, timeout=60)


def test_bad_requests_get_their_status_a_reason_and_an_audit_row(
    stow: tuple[NodeProcess, int, str], tmp_path: Path
) -> None:
    node, port, token = stow
    good = small_chest_copies(tmp_path / "in", 1)[0].read_bytes()
    big = b"\0" * (3 * 1024 * 1024)  # max_request_mb = 1

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is found while streaming
        yield b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n"
        for _ in range(48):
            yield b"\0" * 65536

    cases = [
        (_post(port, _body(good), token=None), 401, "no bearer token"),
        (_post(port, _body(good), token="cxrstow_not-a-token"), 401, "unknown or revoked bearer token"),
        (_post(port, good, token=token, content_type="application/dicom"), 415, "Content-Type application/dicom"),
        (
            _post(
                port, b"{}", token=token, content_type='multipart/related; type="application/dicom+xml"; boundary=XyZ'
            ),
            415,
            "only application/dicom",
        ),
        (
            _post(port, _body(good), token=token, content_type='multipart/related; type="application/dicom"'),
            400,
            "without a valid boundary",
        ),
        (_post(port, b"this is not multipart at all", token=token), 400, "not valid multipart"),
        (_post(port, _body(good)[:-20], token=token), 400, "before the closing multipart boundary"),
        (_post(port, _body(big), token=token), 413, "exceeds dicomweb.max_request_mb"),
        (_post(port, chunks(), token=token), 413, "request body passed"),
    ]
    for rsp, status, words in cases:
        assert rsp.status_code == status and words in rsp.text, (status, rsp.status_code, rsp.text)
    assert _post(port, b"", token=token).status_code == 400
    assert rsp.headers.get("www-authenticate") is None
    assert cases[0][0].headers["www-authenticate"].startswith("Bearer")

    rows = stow_associations(node)
    assert [a.result for a in rows] == ["rejected"] * (len(cases) + 1)
    for (_rsp, status, words), row in zip(cases, rows, strict=False):
        assert row.reason.startswith(f"HTTP {status}: ") and words in row.reason
    assert rows[0].calling_ae == "" and rows[2].calling_ae == SOURCE
    # Nothing half-stored: no instance row, no spool or quarantine file, no partial file left.
    assert node.store().list_instances() == []
    assert not list(node.spool.glob("*/*.dcm")) and not list(node.quarantine.glob("*"))
    wait_for(lambda: not list((node.spool / ".incoming").iterdir()), 10, "no partial files")

    # A good request still works afterwards; a revoked token is refused at once.
    assert _post(port, _body(good), token=token).status_code == 200
    token_id = node.store().list_stow_tokens()[0].id
    node.store().revoke_stow_token(token_id)
    assert _post(port, _body(good), token=token).status_code == 401


def test_a_part_that_is_not_dicom_fails_alone(stow: tuple[NodeProcess, int, str], tmp_path: Path) -> None:
    node, port, token = stow
    (a,) = small_chest_copies(tmp_path / "in", 1)
    body = (
        b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n" + a.read_bytes() + b"\r\n"
        b"--XyZ\r\nContent-Type: text/plain\r\n\r\nhello\r\n--XyZ--\r\n"
    )
    rsp = _post(port, body, token=token)
    assert rsp.status_code == 202
    ds = Dataset.from_json(rsp.json())
    assert [str(i.ReferencedSOPInstanceUID) for i in ds.ReferencedSOPSequence] == [sop_instance_uid(a)]
    assert [int(i.FailureReason) for i in ds.FailedSOPSequence] == [0xC000]
    (rejected,) = node.store().list_instances(InstanceFilter(states=[InstanceState.REJECTED]))
    assert "not application/dicom" in rejected.reason and Path(rejected.quarantine_path).read_bytes() == b"hello"


def test_trailing_pixel_padding_is_stored_with_a_warning_reason(
    stow: tuple[NodeProcess, int, str], tmp_path: Path
) -> None:
    node, port, token = stow
    (a,) = small_chest_copies(tmp_path / "in", 1)
    padded = padded_pixel_data_copy(a, tmp_path / "padded.dcm", 64)
    rsp = _post(port, _body(padded.read_bytes()), token=token)
    assert rsp.status_code == 202  # PS3.18 10.5.3: stored, with a warning
    ds = Dataset.from_json(rsp.json())
    (item,) = ds.ReferencedSOPSequence
    assert str(item.ReferencedSOPInstanceUID) == sop_instance_uid(padded) and int(item.WarningReason) == 0xB007
    assert "FailedSOPSequence" not in ds
    (row,) = node.store().list_instances()
    assert row.state == InstanceState.QUEUED


def test_client_gone_mid_body_leaves_nothing(stow: tuple[NodeProcess, int, str], tmp_path: Path) -> None:
    node, port, token = stow
    (a,) = small_chest_copies(tmp_path / "in", 1)
    body = _body(a.read_bytes())
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            (
                f"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: {MULTIPART}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body[: len(body) // 2]
        )
    wait_for(lambda: any("disconnected" in r.reason for r in stow_associations(node)), 15, "the audit row")
    assert node.store().list_instances() == []
    wait_for(lambda: not list((node.spool / ".incoming").iterdir()), 10, "no partial files")
    assert _post(port, _body(a.read_bytes()), token=token).status_code == 200  # and the node goes on


def test_stow_over_tls(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    key, cert = self_signed(tmp_path, "stow", common_name="node")
    node, port = start_stow_node(
        node_factory, extra_toml=f'\n[dicomweb]\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'
    )
    token = add_token(node)
    (a,) = small_chest_copies(tmp_path / "in", 1)
    session = add_certs_to_session(create_session(), ca_bundle=str(cert))
    session.trust_env = False  # else $REQUESTS_CA_BUNDLE of this machine replaces the CA given here
    dw = DICOMwebClient(
        url=f"https://127.0.0.1:{port}/dicomweb", session=session, headers={"Authorization": f"Bearer {token}"}
    )
    answer = dw.store_instances([pydicom.dcmread(a)])
    assert [str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence] == [sop_instance_uid(a)]
    assert stow_associations(node)[-1].tls
    with pytest.raises(httpx.ConnectError):  # plain HTTP clients and untrusted certificates get nothing
        httpx.post(f"https://127.0.0.1:{port}/dicomweb/studies", content=b"")
    assert node.stop() == 0


def test_disk_low_is_503_before_the_body_is_read(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    node, port = start_stow_node(node_factory, min_free_mb=10**9)
    token = add_token(node)
    (a,) = small_chest_copies(tmp_path / "in", 1)
    rsp = _post(port, _body(a.read_bytes()), token=token)
    assert rsp.status_code == 503 and rsp.headers["retry-after"] == "60" and "storage.min_free_mb" in rsp.text
    (row,) = stow_associations(node)
    assert row.result == "rejected" and row.reason.startswith("HTTP 503: free disk")
    assert node.store().list_instances() == [] and not list((node.spool / ".incoming").iterdir())
    assert node.stop() == 0


def test_results_search_and_retrieve_need_a_token_and_know_only_results(
    stow: tuple[NodeProcess, int, str], tmp_path: Path
) -> None:
    node, port, token = stow
    (a,) = small_chest_copies(tmp_path / "in", 1)
    assert _post(port, _body(a.read_bytes()), token=token).status_code == 200
    ds = pydicom.dcmread(a, stop_before_pixels=True)
    base = f"http://127.0.0.1:{port}/dicomweb/studies/{ds.StudyInstanceUID}"
    auth = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{base}/instances").status_code == 401
    assert httpx.get(f"{base}/instances", headers=auth).status_code == 204  # a source image is no result
    wado = f"{base}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    assert httpx.get(wado, headers=auth).status_code == 404
    assert httpx.get(f"http://127.0.0.1:{port}/dicomweb/studies", headers=auth).status_code == 405
    assert [e.detail["found"] for e in node.store().list_events(kinds=["dicomweb.retrieve"])] == [False]


def test_too_many_parts_and_an_idle_client(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    node, port = start_stow_node(node_factory, extra_toml="\n[dicomweb]\nmax_parts = 3\nidle_timeout_s = 1.5\n")
    token = add_token(node)
    (a,) = small_chest_copies(tmp_path / "in", 1)
    rsp = _post(port, _body(*[a.read_bytes()] * 4), token=token)
    assert rsp.status_code == 413 and "more than 3 parts" in rsp.text
    assert node.store().list_instances() == []

    body = _body(a.read_bytes())
    with socket.create_connection(("127.0.0.1", port)) as sock:  # sends half its body, then nothing
        sock.sendall(
            (
                f"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: {MULTIPART}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body[: len(body) // 2]
        )
        sock.settimeout(15)
        answer = b""
        while chunk := sock.recv(4096):  # until the node closes the connection
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"dicomweb.idle_timeout_s" in answer
    reasons = [r.reason for r in stow_associations(node)]
    assert any("more than 3 parts" in r for r in reasons) and any("idle_timeout_s" in r for r in reasons)
    assert node.store().list_instances() == []
    wait_for(lambda: not list((node.spool / ".incoming").iterdir()), 10, "no partial files")
    assert node.stop() == 0


def test_kill_9_during_stow_loses_no_answered_instance(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    """Persist before answer: requests of 5 files go in one after another while the node is killed -9;
    every instance a 200 answered is there after the restart, once, and a resend is a duplicate."""
    node, port = start_stow_node(node_factory)
    token = add_token(node)
    files = small_chest_copies(tmp_path / "send", 60)
    answered: list[str] = []

    def send() -> None:
        for i in range(0, len(files), 5):
            try:
                rsp = _post(port, _body(*(f.read_bytes() for f in files[i : i + 5])), token=token)
            except httpx.HTTPError:
                return
            if rsp.status_code != 200:
                return
            answered.extend(
                str(x.ReferencedSOPInstanceUID) for x in Dataset.from_json(rsp.json()).ReferencedSOPSequence
            )

    sender = threading.Thread(target=send)
    sender.start()
    wait_for(lambda: len(list(node.spool.glob("*/*.dcm"))) >= 15, 60, "15 instances in the spool")
    node.kill9()
    sender.join(60)
    assert 0 < len(answered) < len(files), "the kill must land in the middle of the send"

    node.start()
    store = node.store()
    for uid in answered:
        (row,) = store.list_instances(InstanceFilter(sop_instance_uid=uid))
        assert Path(row.spool_path).is_file() and pydicom.dcmread(row.spool_path).SOPInstanceUID == uid
    assert all(Path(r.spool_path).is_file() for r in store.list_instances()), "a committed row without its file"
    wait_for(lambda: not list((node.spool / ".incoming").iterdir()), 30, "the restart to clear partial files")
    again = _post(port, _body(files[0].read_bytes()), token=token)
    assert again.status_code == 200
    states = [r.state for r in store.list_instances(InstanceFilter(sop_instance_uid=sop_instance_uid(files[0])))]
    assert states[-1] == InstanceState.DUPLICATE and len(states) == 2
    assert node.stop() == 0


def test_stow_with_several_listener_processes(node_factory: Callable[..., NodeProcess], tmp_path: Path) -> None:
    """With dicom.listeners > 1 STOW-RS runs once, in the services process, beside the forked listeners."""
    port = free_port()
    node = node_factory(extra_toml="listeners = 2\n" + stow_toml(port)).start()
    token = add_token(node)
    files = small_chest_copies(tmp_path / "in", 4)
    answer = post_files(client(port, token), files)
    assert len(answer.ReferencedSOPSequence) == 4
    assert {i.state for i in node.store().list_instances()} == {InstanceState.QUEUED}
    assert node.stop() == 0
