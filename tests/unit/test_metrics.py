"""The metrics registry: named series, helper functions, and DB-backed gauges that never break a scrape."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from node.runtime import metrics


def _samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(name: str, **labels: str) -> float:
    return _samples().get((name, tuple(sorted(labels.items()))), 0.0)


def test_helpers_move_their_series() -> None:
    before = _value("cxrnode_associations_total", result="rejected", reason="calling-ae-not-recognised")
    metrics.count_association("rejected", "calling-ae-not-recognised")
    metrics.count_association("accepted")
    assert _value("cxrnode_associations_total", result="rejected", reason="calling-ae-not-recognised") == before + 1
    assert _value("cxrnode_associations_total", result="accepted", reason="none") >= 1

    metrics.count_instance("stored")
    metrics.count_store_status(0xA700)
    metrics.count_export("dead")
    assert _value("cxrnode_cstore_responses_total", status="0xA700") >= 1
    assert _value("cxrnode_export_attempts_total", result="dead") >= 1

    n = _value("cxrnode_stage_seconds_count", stage="persist")
    metrics.observe_stage("persist", 0.004)
    metrics.observe_inference("lung", 0.2)
    assert _value("cxrnode_stage_seconds_count", stage="persist") == n + 1
    assert _value("cxrnode_stage_seconds_bucket", stage="persist", le="0.005") >= 1
    assert _value("cxrnode_inference_seconds_count", model="lung") >= 1


def test_audit_collector_reports_db_counts_and_survives_db_errors() -> None:
    metrics.register_audit_collector(
        metrics.AuditCollector(
            lambda: {"queued": 3, "exported": 10},
            lambda: {"dead": 2},
            lambda: 3,
            lambda: {"association.rejected": 4, "instance.received": 12},
        )
    )
    assert _value("cxrnode_audit_events_total", kind="association.rejected") == 4
    assert _value("cxrnode_instances_in_state", state="queued") == 3
    assert _value("cxrnode_instances_in_state", state="exported") == 10
    assert _value("cxrnode_exports_in_state", state="dead") == 2

    def broken() -> dict[str, int]:
        raise ConnectionError("database is down")

    assert _value("cxrnode_queue_depth") == 3

    metrics.set_queue_depth(7)
    metrics.register_audit_collector(metrics.AuditCollector(broken))  # replaces the first one
    samples = _samples()
    assert not any(name == "cxrnode_instances_in_state" for name, _ in samples)
    assert _value("cxrnode_queue_depth") == 7  # the last depth a caller saw, without a live probe
    assert any(name == "cxrnode_associations_total" for name, _ in samples)  # the rest still renders


def test_no_created_series_and_text_format() -> None:
    text = metrics.render().decode()
    assert "_created" not in text
    assert metrics.CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_every_metric_in_the_operations_guide_exists() -> None:
    import re

    from tests.support.paths import REPO_ROOT

    metrics.register_audit_collector(
        metrics.AuditCollector(
            lambda: {"queued": 1},
            lambda: {"sent": 1},
            lambda: 0,
            lambda: {"instance.received": 1},
            triage_counts=lambda: {"urgent": 1},
            alert_counts=lambda: {"sent": 1},
        )
    )
    metrics.count_alert("hl7", "success")
    metrics.observe_stage("total", 1.0)
    metrics.observe_inference("lung", 0.1)
    metrics.count_store_status(0)
    metrics.count_export("success")
    metrics.count_commitment("scu", "committed")
    exposed = {s.name for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    exposed |= {name.rsplit("_", 1)[0] for name in exposed}  # histogram families (_bucket/_count/_sum)
    documented = set(re.findall(r"`(cxrnode_[a-z_]+)", (REPO_ROOT / "docs" / "operations.md").read_text()))
    assert documented and documented <= exposed, documented - exposed


def _child_counts(folder: Path, n: int) -> None:
    metrics.reset_listener_metrics()  # what a listener does after the fork
    for _ in range(n):
        metrics.count_association("accepted")
        metrics.count_store_status(0x0000)
        metrics.count_received_bytes(100)
        metrics.observe_stage("persist", 0.01)
    metrics.write_snapshot(folder)


def test_listener_processes_are_summed_by_the_parent(tmp_path: Path) -> None:
    """Issue 17, finding 9: with dicom.listeners > 1 the receiving counters come from forked processes."""
    folder = tmp_path / "listeners"
    metrics.count_store_status(0x0000)  # the parent counts too (e.g. nothing, or its own listener)
    own_ok = _value("cxrnode_cstore_responses_total", status="0x0000")
    own_bytes = _value("cxrnode_received_bytes_total")
    own_persist = _value("cxrnode_stage_seconds_count", stage="persist")
    own_accepted = _value("cxrnode_associations_total", result="accepted", reason="none")
    ctx = multiprocessing.get_context("fork")
    for n in (3, 4):  # two listener processes, the second as a replacement after the first ended
        proc = ctx.Process(target=_child_counts, args=(folder, n))
        proc.start()
        proc.join(30)
        assert proc.exitcode == 0
    (folder / "999999.json").write_text("{not json")  # a torn file is skipped, never a failed scrape
    registry = CollectorRegistry()
    registry.register(metrics.ListenerAggregate(folder))
    summed = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(generate_latest(registry).decode())
        for s in fam.samples
    }
    assert summed[("cxrnode_cstore_responses_total", (("status", "0x0000"),))] == own_ok + 7
    assert summed[("cxrnode_received_bytes_total", ())] == own_bytes + 700
    assert summed[("cxrnode_stage_seconds_count", (("stage", "persist"),))] == own_persist + 7
    assert summed[("cxrnode_associations_total", (("reason", "none"), ("result", "accepted")))] == own_accepted + 7
