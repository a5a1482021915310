"""Prometheus metrics of the node: one registry, named metrics, and small helpers other modules call.

Event counters and latency histograms live in this process (the SCP, the `node` queue consumer and
the web server each count what they see). Numbers the audit database already knows — instances per
state, dead exports — are read at scrape time by `AuditCollector`, so they are right across
processes and restarts. `/metrics` on the web server renders `REGISTRY`.

With `dicom.listeners > 1` the receiving happens in forked listener processes, whose counters the
parent's `/metrics` would never see. Each listener writes a snapshot of the receiving metrics
(`LISTENER_METRICS`) to a folder every `SNAPSHOT_INTERVAL_S` and when it stops; the parent's
`ListenerAggregate` adds every snapshot to its own values at scrape time. Snapshots are per process
id and kept after the process ends, so a listener that dies and is replaced does not make a counter
go down (at most its last interval is lost). The prometheus_client multiprocess mode was not used:
it must be chosen before prometheus_client is imported and does not support `Info`.

Label values are small fixed vocabularies (states, reasons, stage names): never put UIDs, AE titles
of arbitrary peers or anything patient-related in a label.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The *_created series double the output and no dashboard uses them.
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)

#: Pipeline stages timed by `observe_stage` (seconds from the previous stage's end).
STAGES = ("receive", "persist", "route", "prepare", "queue_wait", "inference", "results", "analysis", "export", "total")

# Latency buckets from a few ms (persist) to minutes (export with retries).
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

BUILD_INFO = Info("cxrnode_build", "Version of the running node", registry=REGISTRY)

ASSOCIATIONS = Counter(
    "cxrnode_associations_total",
    "DICOM associations requested by peers, by result (accepted/rejected) and rejection reason",
    ["result", "reason"],
    registry=REGISTRY,
)
INSTANCES = Counter(
    "cxrnode_instances_total",
    "Instances reaching a state in this process (received, duplicate, queued, skipped, failed, ...)",
    ["state"],
    registry=REGISTRY,
)
STORE_STATUS = Counter(
    "cxrnode_cstore_responses_total", "C-STORE responses sent, by DIMSE status (hex)", ["status"], registry=REGISTRY
)
EXPORTS = Counter(
    "cxrnode_export_attempts_total",
    "C-STORE SCU export attempts, by result (success/retry/dead)",
    ["result"],
    registry=REGISTRY,
)
COMMITMENTS = Counter(
    "cxrnode_storage_commitments_total",
    "Storage commitment: as SCU (committed/failed/expired/unknown report) and SCP (answered/report_failed/bad_request)",
    ["role", "outcome"],
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "cxrnode_stage_seconds", "Latency per pipeline stage", ["stage"], buckets=_SECONDS_BUCKETS, registry=REGISTRY
)
INFERENCE_SECONDS = Histogram(
    "cxrnode_inference_seconds",
    "Model inference time as reported by the workers",
    ["model"],
    buckets=_SECONDS_BUCKETS,
    registry=REGISTRY,
)
RECEIVED_BYTES = Counter(
    "cxrnode_received_bytes_total", "Bytes of DICOM datasets received by C-STORE", registry=REGISTRY
)
TRIAGE_DECISIONS = Counter(
    "cxrnode_triage_decisions_total",
    "Study triage decisions made in this process, by level",
    ["level"],
    registry=REGISTRY,
)
ALERTS = Counter(
    "cxrnode_alert_attempts_total",
    "Triage alert delivery attempts, by destination type and result",
    ["kind", "result"],
    registry=REGISTRY,
)
WEB_ACTIONS = Counter(
    "cxrnode_web_actions_total", "Changes made in the admin console, by action", ["action"], registry=REGISTRY
)


def set_build_info(version: str, mode: str) -> None:
    BUILD_INFO.info({"version": version, "mode": mode})


def count_association(result: str, reason: str = "") -> None:
    """result: 'accepted' or 'rejected'; reason: e.g. 'calling-ae-not-recognised' (empty when accepted)."""
    ASSOCIATIONS.labels(result=result, reason=reason or "none").inc()


def count_instance(state: str) -> None:
    INSTANCES.labels(state=state).inc()


def count_store_status(status: int) -> None:
    STORE_STATUS.labels(status=f"0x{status:04X}").inc()


def count_received_bytes(n: int) -> None:
    RECEIVED_BYTES.inc(n)


def count_commitment(role: str, outcome: str) -> None:
    """role 'scu' (the node asked a destination) or 'scp' (a sender asked the node)."""
    COMMITMENTS.labels(role=role, outcome=outcome).inc()


def count_export(result: str) -> None:
    """result: 'success', 'retry' (failed, will retry) or 'dead' (gave up)."""
    EXPORTS.labels(result=result).inc()


def observe_stage(stage: str, seconds: float) -> None:
    if stage not in STAGES:
        # A typo would silently create a new series; say so once per call site instead.
        log.warning("unknown pipeline stage %r (known: %s)", stage, ", ".join(STAGES))
    STAGE_SECONDS.labels(stage=stage).observe(max(0.0, seconds))


def observe_inference(model: str, seconds: float) -> None:
    INFERENCE_SECONDS.labels(model=model).observe(max(0.0, seconds))


_last_queue_depth: int | None = None


def set_queue_depth(n: int) -> None:
    """Record the inference queue depth seen by the caller (exported when no live probe is wired)."""
    global _last_queue_depth
    _last_queue_depth = n


def count_triage(level: str) -> None:
    TRIAGE_DECISIONS.labels(level=level).inc()


def count_alert(kind: str, result: str) -> None:
    ALERTS.labels(kind=kind, result=result).inc()


def count_web_action(action: str) -> None:
    WEB_ACTIONS.labels(action=action).inc()


class AuditCollector(Collector):
    """Read at scrape time: instances/exports per state and events per kind (audit DB), queue depth.

    `instance_counts` / `export_counts` return {state: count}; `queue_depth` the messages waiting on
    the broker (None = unknown). A failing query is logged and its gauges are left out of that scrape
    (a scrape must never fail because the DB or broker is slow).
    """

    def __init__(
        self,
        instance_counts: Callable[[], Mapping[str, int]],
        export_counts: Callable[[], Mapping[str, int]] | None = None,
        queue_depth: Callable[[], int | None] | None = None,
        event_counts: Callable[[], Mapping[str, int]] | None = None,
        triage_counts: Callable[[], Mapping[str, int]] | None = None,
        alert_counts: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self._instance_counts = instance_counts
        self._triage_counts = triage_counts
        self._alert_counts = alert_counts
        self._export_counts = export_counts
        self._queue_depth = queue_depth
        self._event_counts = event_counts

    def describe(self) -> Iterable[Metric]:
        return []  # no DB query at registration time

    def collect(self) -> Iterable[Metric]:
        try:
            inst = GaugeMetricFamily(
                "cxrnode_instances_in_state", "Instances in the audit DB by current state", labels=["state"]
            )
            for state, n in sorted(self._instance_counts().items()):
                inst.add_metric([state], n)
            yield inst
            if self._export_counts is not None:
                exp = GaugeMetricFamily(
                    "cxrnode_exports_in_state", "Exports in the audit DB by current state", labels=["state"]
                )
                for state, n in sorted(self._export_counts().items()):
                    exp.add_metric([state], n)
                yield exp
            if self._triage_counts is not None:
                counts = self._triage_counts()
                tri = GaugeMetricFamily(
                    "cxrnode_triage_studies", "Decided studies in the audit DB by triage level", labels=["level"]
                )
                for level in ("critical", "urgent", "routine"):  # always all three: alerts need a series
                    tri.add_metric([level], counts.get(level, 0))
                yield tri
            if self._alert_counts is not None:
                al = GaugeMetricFamily(
                    "cxrnode_alerts_in_state", "Triage alerts in the audit DB by state", labels=["state"]
                )
                for state, n in sorted(self._alert_counts().items()):
                    al.add_metric([state], n)
                yield al
            if self._event_counts is not None:
                # The append-only event table is a set of counters that survive restarts and span every
                # process: association.accepted/rejected, instance.<state>, export.sent/retry/dead, ae.*, web.*
                events = CounterMetricFamily(
                    "cxrnode_audit_events", "Audit log events by kind (all processes)", labels=["kind"]
                )
                for kind, n in sorted(self._event_counts().items()):
                    events.add_metric([kind], n)
                yield events
        except Exception:
            log.warning("audit metrics unavailable for this scrape", exc_info=True)
        depth = self._queue_depth() if self._queue_depth is not None else _last_queue_depth
        if depth is not None:
            yield GaugeMetricFamily(
                "cxrnode_queue_depth", "Analysis requests waiting on the broker's inference queue", value=depth
            )


_audit_collector: AuditCollector | None = None


def register_audit_collector(collector: AuditCollector) -> None:
    """Install (or replace) the DB-backed collector; idempotent across app factories in one process."""
    global _audit_collector
    if _audit_collector is not None:
        REGISTRY.unregister(_audit_collector)
    REGISTRY.register(collector)
    _audit_collector = collector


#: What listener processes count: associations, C-STORE statuses, bytes, instances, stage latencies.
LISTENER_METRICS: tuple[Any, ...] = (ASSOCIATIONS, INSTANCES, STORE_STATUS, RECEIVED_BYTES, STAGE_SECONDS, COMMITMENTS)
SNAPSHOT_INTERVAL_S = 2.0


def write_snapshot(folder: Path, metrics: Iterable[Any] = LISTENER_METRICS) -> Path:
    """Write this process's values of `metrics` to `folder`/<pid>.json (atomically)."""
    families = [
        {
            "name": fam.name,
            "type": fam.type,
            "doc": fam.documentation,
            "samples": [[smp.name, smp.labels, smp.value] for smp in fam.samples],
        }
        for metric in metrics
        for fam in metric.collect()
    ]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{os.getpid()}.json"
    tmp = folder / f".{os.getpid()}.json.tmp"
    tmp.write_text(json.dumps(families))
    os.replace(tmp, path)
    return path


def reset_listener_metrics() -> None:
    """Zero `LISTENER_METRICS` in a freshly forked listener: it inherited the parent's values, which the
    parent reports itself."""
    for metric in (ASSOCIATIONS, INSTANCES, STORE_STATUS, STAGE_SECONDS, COMMITMENTS):
        metric.clear()
    RECEIVED_BYTES.reset()


class SnapshotWriter:
    """In a listener process: `write_snapshot` every interval until `stop()`, then once more."""

    def __init__(self, folder: Path, interval_s: float = SNAPSHOT_INTERVAL_S) -> None:
        self.folder, self.interval_s = folder, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-snapshot", daemon=True)

    def start(self) -> SnapshotWriter:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write()

    def _write(self) -> None:
        try:
            write_snapshot(self.folder)
        except OSError as e:
            log.warning("cannot write the metrics snapshot to %s: %s", self.folder, e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._write()


class ListenerAggregate(Collector):
    """In the parent: `metrics` summed over this process and every snapshot in `folder`."""

    def __init__(self, folder: Path, metrics: Iterable[Any] = LISTENER_METRICS) -> None:
        self.folder = folder
        self.metrics = tuple(metrics)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}

        def add(name: str, type_: str, doc: str, samples: Iterable[Any]) -> None:
            values = families.setdefault(name, (type_, doc, {}))[2]
            for sample_name, labels, value in samples:
                key = (sample_name, tuple(sorted(labels.items())))
                values[key] = values.get(key, 0.0) + float(value)

        for metric in self.metrics:
            for fam in metric.collect():
                add(fam.name, fam.type, fam.documentation, ((x.name, x.labels, x.value) for x in fam.samples))
        for path in sorted(self.folder.glob("*.json")):
            try:
                for fam in json.loads(path.read_text()):
                    if fam["name"] in families:  # only the metrics this collector stands for
                        add(fam["name"], fam["type"], fam["doc"], fam["samples"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("skipping metrics snapshot %s: %s", path, e)
        for name, (type_, doc, values) in families.items():
            family = Metric(name, doc, type_)
            for (sample_name, labels), value in values.items():
                family.add_sample(sample_name, dict(labels), value)
            yield family


_aggregate: ListenerAggregate | None = None


def aggregate_listeners(folder: Path) -> ListenerAggregate:
    """In the parent of listener processes: export `LISTENER_METRICS` summed over them all (replacing
    this process's own series of those metrics, which the aggregate includes). Empties `folder`."""
    global _aggregate
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.json"):
        old.unlink()
    if _aggregate is None:
        for metric in LISTENER_METRICS:
            REGISTRY.unregister(metric)
    else:
        REGISTRY.unregister(_aggregate)
    _aggregate = ListenerAggregate(folder)
    REGISTRY.register(_aggregate)
    return _aggregate


def render() -> bytes:
    """The text exposition of every metric in `REGISTRY`."""
    return generate_latest(REGISTRY)
