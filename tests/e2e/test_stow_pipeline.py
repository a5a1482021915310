"""End to end over DICOMweb: STOW-RS in (dicomweb-client) -> `cxrnode serve` -> Celery worker -> SEG + SR
out by STOW-RS to Orthanc's DICOMweb plugin (basic auth), read back from Orthanc by QIDO-RS and from the
node's own QIDO-RS / WADO-RS.

The results go back by `reply-to-sender`: the token's source names an AE entry with a STOW-RS URL, so a
DICOMweb-only peer gets its results the way a DICOM peer does.
"""

from __future__ import annotations

import base64
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.e2e.test_pipeline import node_toml, tiny_weights, wait_final, worker_env  # noqa: F401 (fixtures)
from tests.support.net import free_port
from tests.support.node import NodeProcess
from tests.support.orthanc import Orthanc
from tests.support.paths import dicom_dir
from tests.support.stow import SOURCE, add_token, client, post_files, stow_toml

pytestmark = pytest.mark.timeout(600)
FILES = ["09_cr_8bit_alloc8.dcm", "25_cr_hand_bodypart.dcm"]  # one analysed, one routed away


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    with Orthanc(tmp_path / "orthanc", dicomweb=True, users={"cxr": "s3cret"}) as pacs:
        yield pacs


def _dicomweb_get(orthanc: Orthanc, path: str) -> list[dict[str, dict[str, list[str]]]]:
    request = urllib.request.Request(
        orthanc.dicomweb_url + path,
        headers={
            "Accept": "application/dicom+json",
            "Authorization": "Basic " + base64.b64encode(b"cxr:s3cret").decode(),
        },
    )
    with urllib.request.urlopen(request, timeout=30) as rsp:
        return list(json.loads(rsp.read()))


def test_stow_in_results_out_by_stow_to_orthanc(tmp_path: Path, orthanc: Orthanc) -> None:
    port = free_port()
    reply = (
        f'\n[[ae]]\nname = "{SOURCE}"\nrole = "destination"\nurl = "{orthanc.dicomweb_url}"\n'
        'auth = "basic"\nusername = "cxr"\nsecret = "s3cret"\n'
    )
    node = NodeProcess(
        tmp_path, extra_toml=stow_toml(port) + node_toml(["reply-to-sender"], extra_ae=reply), sources=(), analysis=True
    )
    try:
        node.start()
        token = add_token(node)
        answer = post_files(client(port, token), [dicom_dir() / f for f in FILES])
        assert len(answer.ReferencedSOPSequence) == 2
        states = wait_final(node, 2)
        source = pydicom.dcmread(dicom_dir() / FILES[0], stop_before_pixels=True)
        assert states[str(source.SOPInstanceUID)] == "exported"
        assert sorted(states.values()) == ["exported", "skipped"]

        # QIDO-RS at Orthanc: the SEG and SR, in the source's study; WADO-RS: the objects themselves.
        found = _dicomweb_get(orthanc, f"/studies/{source.StudyInstanceUID}/instances")
        modalities = sorted(i["00080060"]["Value"][0] for i in found)
        assert modalities == ["SEG", "SR"]
        store = node.store()
        inst = store.find_live_instance(str(source.SOPInstanceUID))
        assert inst is not None and inst.calling_ae == SOURCE
        exports = store.list_exports(inst.id)
        assert {e.destination_ae for e in exports} == {SOURCE} and all(e.state == "sent" for e in exports)
        assert {i["00080018"]["Value"][0] for i in found} == {e.sop_instance_uid for e in exports}
        for e in exports:
            assert Path(e.file_path).read_bytes() in {orthanc.instance_file(i) for i in orthanc.instances()}

        # The node's own results for a viewer: QIDO-RS and WADO-RS with the same token, audited.
        dw = client(port, token)
        mine = dw.search_for_instances(study_instance_uid=str(source.StudyInstanceUID))
        assert {i["00080018"]["Value"][0] for i in mine} == {e.sop_instance_uid for e in exports}
        seg = next(i for i in mine if i["00080060"]["Value"][0] == "SEG")
        got = dw.retrieve_instance(
            str(source.StudyInstanceUID), seg["0020000E"]["Value"][0], seg["00080018"]["Value"][0]
        )
        assert got.Modality == "SEG" and got.SOPInstanceUID == seg["00080018"]["Value"][0]
        assert [e.detail["found"] for e in store.list_events(kinds=["dicomweb.retrieve"])] == [True]
    finally:
        node.close()
