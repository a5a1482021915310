"""Persist before ack: `kill -9` of the node in the middle of a 100-file send loses nothing acknowledged."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from node.audit import InstanceFilter, InstanceState
from tests.support.dcmtk import StoreResult, parse_store_responses, storescu
from tests.support.net import wait_for
from tests.support.node import NodeProcess
from tests.support.synthetic_dicom import small_chest_copies

pytestmark = pytest.mark.timeout(300)

N_FILES = 100


def test_kill_9_during_a_send_loses_no_acknowledged_instance(
    node_factory: Callable[..., NodeProcess], tmp_path: Path
) -> None:
    files = small_chest_copies(tmp_path / "send", N_FILES)
    node = node_factory().start()

    # storescu in a thread; kill -9 the node once some instances are in.
    out: list[StoreResult] = []
    sender = threading.Thread(target=lambda: out.append(storescu(node.port, files, timeout=120)))
    sender.start()
    wait_for(lambda: len(list(node.spool.glob("*/*.dcm"))) >= 25, 60, "25 instances in the spool")
    node.kill9()
    sender.join(120)
    acked = {uid for uid, status in out[0].responses.items() if status == 0x0000}
    assert 0 < len(acked) < N_FILES, "the kill must land in the middle of the send"

    node.start()  # restart: resume what was pending
    store = node.store()
    for uid in acked:
        rows = store.list_instances(InstanceFilter(sop_instance_uid=uid))
        assert len(rows) == 1, f"{uid}: {len(rows)} rows"
        assert Path(rows[0].spool_path).is_file()
        assert pydicom.dcmread(rows[0].spool_path).SOPInstanceUID == uid
    live = store.list_instances()
    assert all(Path(r.spool_path).is_file() for r in live), "a committed row without its file"
    spooled = {p.stem for p in node.spool.glob("*/*.dcm")}
    assert len(spooled) == len(list(node.spool.glob("*/*.dcm")))  # each instance once
    assert acked <= spooled
    wait_for(
        lambda: not store.list_instances(InstanceFilter(states=[InstanceState.RECEIVED])),
        30,
        "resume to route every received instance",
    )
    assert not list((node.spool / ".incoming").iterdir())

    # The sender retries everything: what was acknowledged is a duplicate, the rest is stored, once each.
    retry = storescu(node.port, files, timeout=120)
    assert set(retry.statuses) == {0x0000} and len(retry.responses) == N_FILES
    for path in files:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        states = [r.state for r in store.list_instances(InstanceFilter(sop_instance_uid=uid))]
        if uid in acked:
            assert states == [InstanceState.QUEUED, InstanceState.DUPLICATE], (uid, states)
        else:  # stored once: before the kill without an answer (then duplicate now), or only now
            assert states in ([InstanceState.QUEUED], [InstanceState.QUEUED, InstanceState.DUPLICATE]), (uid, states)
    assert len(list(node.spool.glob("*/*.dcm"))) == N_FILES
    assert node.stop() == 0


def test_parse_store_responses_reads_storescu_debug_output() -> None:
    block = (
        "D: Message Type                  : C-STORE RSP\nD: Affected SOP Instance UID     : 1.2.3\n"
        "D: DIMSE Status                  : 0xa900: Error\nD: ====== END DIMSE MESSAGE ======\n"
    )
    assert parse_store_responses(block) == {"1.2.3": 0xA900}
