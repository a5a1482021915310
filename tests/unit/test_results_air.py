"""The worker contract's additions for IHE AI Results and the identities derived from it: the analysis start
travels as an optional field that a worker sends only to a node that asked for it (so old and new nodes and
workers mix in either order), unknown fields are ignored, and the device UIDs are stable."""

from __future__ import annotations

from datetime import UTC, datetime

from pydicom.uid import UID

from node.analysis.finish import analysis_started
from node.results.common import DeviceInfo, model_device_uid
from workers.api import OPTIONAL_RESULT_FIELDS, AnalyzeRequest, AnalyzeResult, ModelInfo

MODEL = ModelInfo("lung", "1.2.0", "a" * 64, "validated", "DeepLabV3+ efficientnet-b1")


def test_started_at_round_trips() -> None:
    result = AnalyzeResult(
        job_id="7.1764750000000", rows=2, cols=3, models=[MODEL], started_at="2026-12-01T08:30:15.250000+00:00"
    )
    back = AnalyzeResult.from_message(result.to_message())
    assert back == result
    assert back.started() == datetime(2026, 12, 1, 8, 30, 15, 250000, tzinfo=UTC)


def test_optional_fields_go_only_to_a_node_that_asks() -> None:
    import numpy as np

    request = AnalyzeRequest.build("7.0", np.zeros((4, 4), dtype=np.uint8))
    assert request.result_fields == OPTIONAL_RESULT_FIELDS == ("started_at",)
    # What a worker reads from this node's request, and from an older node's (no result_fields key).
    assert AnalyzeRequest.from_message(request.to_message()).result_fields == ("started_at",)
    older = request.to_message()
    del older["result_fields"]
    assert AnalyzeRequest.from_message(older).result_fields == ()
    result = AnalyzeResult(job_id="7.0", rows=4, cols=4, started_at="2026-12-01T08:30:15+00:00")
    assert "started_at" not in result.to_message(())  # an older node would refuse the unknown key
    assert result.to_message(("started_at",))["started_at"] == result.started_at


def test_result_of_an_older_worker_still_reads() -> None:
    message = AnalyzeResult(job_id="7.1764750000000", rows=2, cols=3, models=[MODEL]).to_message()
    del message["started_at"]
    back = AnalyzeResult.from_message(message)
    assert back.started_at is None and back.started() is None
    # The node then dates the content by when it queued the run (the job id's stamp, ms since the epoch).
    assert analysis_started(back) == datetime.fromtimestamp(1764750000, UTC)


def test_fields_of_a_newer_worker_are_ignored() -> None:
    message = AnalyzeResult(job_id="7.0", rows=2, cols=3, models=[MODEL]).to_message()
    message["calibration"] = {"ece": 0.02}
    message["models"][0]["license"] = "CC-BY-4.0"
    back = AnalyzeResult.from_message(message)
    assert back.models == [MODEL] and not hasattr(back, "calibration")


def test_unreadable_or_naive_start_is_none() -> None:
    assert AnalyzeResult(job_id="7.0", rows=1, cols=1, started_at="yesterday").started() is None
    assert AnalyzeResult(job_id="7.0", rows=1, cols=1, started_at="2026-12-01T08:30:15").started() is None
    assert analysis_started(AnalyzeResult(job_id="7.0", rows=1, cols=1)) is None


def test_worker_start_wins_over_the_queueing_time() -> None:
    result = AnalyzeResult(job_id="7.1764750000000", rows=1, cols=1, started_at="2026-12-03T04:00:00+01:00")
    assert analysis_started(result) == datetime(2026, 12, 3, 3, 0, tzinfo=UTC)


def test_device_uids_are_stable() -> None:
    assert DeviceInfo().uid == DeviceInfo().uid  # same identity, same Device Observer UID, every process
    assert DeviceInfo(serial_number="NODE2").uid != DeviceInfo().uid
    uid = model_device_uid(MODEL)
    assert uid.startswith("2.25.") and len(uid) <= 64 and UID(uid).is_valid
    assert model_device_uid(MODEL) == model_device_uid(ModelInfo("lung", "1.3.0", "a" * 64, "experimental", "x"))
    assert model_device_uid(MODEL) != model_device_uid(ModelInfo("lung", "1.2.0", "b" * 64, "validated", "x"))
