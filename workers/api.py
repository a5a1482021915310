"""The contract between the node and the workers: task names, queues and message schemas.

The node imports only this module of `workers` (import-linter enforces it), so it must never import
torch, numpy-heavy model code or pynetdicom. Messages are JSON: pixels travel as PNG bytes (base64),
masks as packed bits (base64). They carry opaque ids only, never patient identifiers.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any

import numpy as np

# Model and mask names (the order the worker runs them and the SEG lists them) are part of this contract.
from workers.catalogue import MASK_NAMES as MASK_NAMES
from workers.catalogue import MODEL_NAMES as MODEL_NAMES

ANALYZE_TASK = "workers.analyze"
FINISH_TASK = "node.finish"
INFERENCE_QUEUE = "inference"
NODE_QUEUE = "node"


def node_queue(node_name: str) -> str:
    """The queue of one node's `node.finish` worker. Results go back to the node that asked (it holds
    the source image and builds SEG and SR from it), so each node has its own: with two nodes on one
    broker a shared queue would hand a result to a node that cannot read the image."""
    return f"{NODE_QUEUE}.{node_name}" if node_name else NODE_QUEUE


SCHEMA_VERSION = 1

#: AnalyzeResult fields added within schema 1. A node lists those it can read in its request
#: (`AnalyzeRequest.result_fields`) and the worker sends no others: an older node (whose requests list
#: none) never receives a field it would refuse, and an older worker simply does not send them.
OPTIONAL_RESULT_FIELDS: tuple[str, ...] = ("started_at",)

log = logging.getLogger(__name__)

#: Celery task priority (Redis: lower = sooner) from the C-STORE Priority (0000,0700) of the source.
#: DICOM values: 0x0000 MEDIUM, 0x0001 HIGH, 0x0002 LOW.
CSTORE_PRIORITY_TO_TASK = {0x0001: 0, 0x0000: 5, 0x0002: 9}
DEFAULT_TASK_PRIORITY = 5

#: Redis broker transport options BOTH sides must share: a task's priority picks its Redis list
#: (`inference`, `inference:1`, ... `inference:9`), so producer and consumer must agree on the steps.
REDIS_TRANSPORT_OPTIONS: dict[str, Any] = {
    "priority_steps": list(range(10)),
    "sep": ":",
    "queue_order_strategy": "priority",
}

#: Redis: seconds a delivered, unacknowledged task stays invisible unless its worker renews it (its
#: lease). Every live consumer renews the leases of the messages it holds every LEASE_S / 4
#: (`workers.broker.LeaseKeeper`), so a task may run for its whole time limit (600 s) without being
#: delivered twice; when a whole worker dies (kill -9, power cut) its leases lapse and another
#: consumer's restore sweep (every `restore_interval(lease)` s) puts the task back on the queue:
#: the result comes about LEASE_S + 10 s + one task later, instead of Redis' default hour. Every
#: consumer of one Redis database (the node's `node` queue worker and all inference workers) must
#: use the same lease: the shortest one would take the others' messages back.
DEFAULT_LEASE_S = 60.0


def restore_interval(lease_s: float) -> float:
    """Seconds between a consumer's sweeps for lapsed leases (kombu's unacked_restore_interval)."""
    return max(1.0, min(10.0, lease_s / 4))


def redis_transport_options(lease_s: float = DEFAULT_LEASE_S) -> dict[str, Any]:
    """REDIS_TRANSPORT_OPTIONS with the lease: visibility timeout and a restore sweep that scans on
    every tick (kombu otherwise scans one tick in ten, ~100 s)."""
    return {
        **REDIS_TRANSPORT_OPTIONS,
        "visibility_timeout": lease_s,
        "unacked_restore_interval": restore_interval(lease_s),
        "unacked_restore_throttle": 1,
    }


def task_priority(cstore_priority: int | None) -> int:
    """Celery priority for an instance received with this C-STORE Priority (None/unknown = MEDIUM)."""
    return CSTORE_PRIORITY_TO_TASK.get(cstore_priority if cstore_priority is not None else 0, DEFAULT_TASK_PRIORITY)


def encode_png(pixels: np.ndarray) -> str:
    """uint8 2-D array -> base64 PNG (lossless, ~3x smaller than raw for radiographs)."""
    from PIL import Image

    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 array, got {pixels.dtype} {pixels.shape}")
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(data))) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


def pack_mask(mask: np.ndarray) -> str:
    """bool/0-1 2-D mask -> base64 of np.packbits (row-major); shape travels separately."""
    return base64.b64encode(np.packbits(np.asarray(mask, dtype=bool), axis=None).tobytes()).decode("ascii")


def unpack_mask(data: str, rows: int, cols: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(base64.b64decode(data), dtype=np.uint8), count=rows * cols)
    return bits.reshape(rows, cols).astype(bool)


def reply_queue_of(msg: Any) -> str:
    """The queue a request asks its result to go to (the shared `node` queue when it names none or garbage)."""
    queue = msg.get("reply_queue") if isinstance(msg, dict) else None
    return queue if isinstance(queue, str) and queue.startswith(NODE_QUEUE) and len(queue) <= 80 else NODE_QUEUE


@dataclass(frozen=True)
class AnalyzeRequest:
    """Sent by the node on queue `inference`. `job_id` is opaque (no UIDs, no names)."""

    job_id: str
    pixels_png: str  # base64 PNG, uint8, already windowed/inverted by node.analysis.prepare
    rows: int
    cols: int
    models: tuple[str, ...] = MODEL_NAMES
    schema: int = SCHEMA_VERSION
    # Site override of the severity zone threshold (config models.severity_zone_threshold); None = card's.
    zone_threshold: float | None = None
    # Optional AnalyzeResult fields this node reads (OPTIONAL_RESULT_FIELDS); absent in older nodes' requests.
    result_fields: tuple[str, ...] = ()
    # Where the worker sends the result (`node_queue` of the asking node); older nodes leave it out.
    reply_queue: str = NODE_QUEUE

    @classmethod
    def build(
        cls,
        job_id: str,
        pixels: np.ndarray,
        models: tuple[str, ...] = MODEL_NAMES,
        zone_threshold: float | None = None,
        reply_queue: str = NODE_QUEUE,
    ) -> AnalyzeRequest:
        unknown = set(models) - set(MODEL_NAMES)
        if unknown:
            raise ValueError(f"unknown models {sorted(unknown)}; known: {MODEL_NAMES}")
        return cls(
            job_id=job_id,
            pixels_png=encode_png(pixels),
            rows=int(pixels.shape[0]),
            cols=int(pixels.shape[1]),
            models=tuple(models),
            zone_threshold=zone_threshold,
            result_fields=OPTIONAL_RESULT_FIELDS,
            reply_queue=reply_queue,
        )

    def pixels(self) -> np.ndarray:
        arr = decode_png(self.pixels_png)
        if arr.shape != (self.rows, self.cols):
            raise ValueError(f"pixel shape {arr.shape} != declared {(self.rows, self.cols)}")
        return arr

    def to_message(self) -> dict[str, Any]:
        d = asdict(self)
        d["models"] = list(self.models)
        d["result_fields"] = list(self.result_fields)
        return d

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> AnalyzeRequest:
        if msg.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"unsupported message schema {msg.get('schema')!r}")
        return cls(
            job_id=str(msg["job_id"]),
            pixels_png=str(msg["pixels_png"]),
            rows=int(msg["rows"]),
            cols=int(msg["cols"]),
            models=tuple(msg.get("models", MODEL_NAMES)),
            zone_threshold=None if msg.get("zone_threshold") is None else float(msg["zone_threshold"]),
            result_fields=tuple(str(f) for f in msg.get("result_fields") or ()),
            reply_queue=reply_queue_of(msg),
        )


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    sha256: str
    status: str  # "validated" | "experimental"
    architecture: str
    # The card's one-line held-out figures and weakness (`sr_performance`), for the SR: a weak model
    # says so where its numbers are read. Optional, so either side may be older.
    performance: str = ""


@dataclass
class AnalyzeResult:
    """Returned by the worker. Masks are on the request's pixel grid (rows x cols)."""

    job_id: str
    rows: int
    cols: int
    masks: dict[str, str] = field(default_factory=dict)  # MASK_NAMES -> packed bits
    # severity (present when lung + opacity ran)
    severity_score: int | None = None
    zone_fractions: list[float] | None = None  # right upper, middle, lower, left upper, middle, lower
    zone_affected: list[bool] | None = None
    opacity_fraction: dict[str, float] | None = None  # {"right": f, "left": f} of lung area
    lung_area_px: dict[str, int] | None = None  # {"right": n, "left": n} in request pixels
    # pneumothorax
    pneumothorax_probability: float | None = None
    pneumothorax_present: bool | None = None
    pneumothorax_side: str | None = None  # "right" | "left" | "both" | None
    pneumothorax_area_px: int | None = None
    models: list[ModelInfo] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    schema: int = SCHEMA_VERSION
    # Set when the job could not be analysed (unreadable message, model failure); the other fields
    # are then empty and the node marks the instance failed with this reason instead of retrying.
    error: str | None = None
    # When the worker started the analysis (ISO 8601 with offset): the results' Content Date/Time.
    # Optional within schema 1 (OPTIONAL_RESULT_FIELDS): older workers do not send it, and the node then
    # uses its queueing time.
    started_at: str | None = None

    def started(self) -> datetime | None:
        """`started_at` as an aware datetime, or None when absent or unreadable."""
        if not self.started_at:
            return None
        try:
            moment = datetime.fromisoformat(self.started_at)
        except ValueError:
            return None
        return moment if moment.tzinfo is not None else None

    def mask(self, name: str) -> np.ndarray | None:
        data = self.masks.get(name)
        return None if data is None else unpack_mask(data, self.rows, self.cols)

    def to_message(self, result_fields: Iterable[str] = OPTIONAL_RESULT_FIELDS) -> dict[str, Any]:
        """The message, without the optional fields its node does not read (see OPTIONAL_RESULT_FIELDS)."""
        readable = set(result_fields)
        return {k: v for k, v in asdict(self).items() if k not in OPTIONAL_RESULT_FIELDS or k in readable}

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> AnalyzeResult:
        if msg.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"unsupported message schema {msg.get('schema')!r}")
        # Unknown fields are ignored (a worker sends optional ones only when asked, see
        # OPTIONAL_RESULT_FIELDS; this keeps the node lenient towards any other addition too).
        known = {f.name for f in fields(cls)}
        extra = sorted(set(msg) - known)
        if extra:
            log.debug("ignoring unknown result fields %s", extra)
        data = {k: v for k, v in msg.items() if k in known}
        data["models"] = [
            ModelInfo(**{k: v for k, v in m.items() if k in _MODEL_FIELDS}) for m in msg.get("models", [])
        ]
        return cls(**data)


_MODEL_FIELDS = frozenset(f.name for f in fields(ModelInfo))


# -- Celery settings shared by the node's app and the workers' app (one definition, two processes) -----

#: The node's own spelling (`[broker]` keys as CXRNODE_<SECTION>__<KEY>), so one environment file
#: configures the node and its workers alike.
BROKER_ENV = "CXRNODE_BROKER__URL"
RESULT_BACKEND_ENV = "CXRNODE_BROKER__RESULT_BACKEND"
TIME_LIMIT_ENV = "CXRNODE_BROKER__TASK_TIME_LIMIT"
LEASE_ENV = "CXRNODE_BROKER__LEASE_S"
#: Spellings of earlier releases, still read with a warning (deployed worker.env files keep working).
DEPRECATED_ENV: dict[str, str] = {
    "CXRNODE_BROKER_URL": BROKER_ENV,
    "CXRNODE_RESULT_BACKEND": RESULT_BACKEND_ENV,
    "CXRNODE_TASK_TIME_LIMIT": TIME_LIMIT_ENV,
}


def broker_environment(environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The worker's broker settings from `environ` (keys BROKER_ENV, RESULT_BACKEND_ENV, TIME_LIMIT_ENV,
    LEASE_ENV, only those given) and a warning per deprecated spelling found."""
    values = {
        name: environ[name] for name in (BROKER_ENV, RESULT_BACKEND_ENV, TIME_LIMIT_ENV, LEASE_ENV) if environ.get(name)
    }
    warnings = []
    for old, new in DEPRECATED_ENV.items():
        if not environ.get(old):
            continue
        if new in values:
            if values[new] != environ[old]:
                warnings.append(f"{old} is deprecated and ignored: {new} is set and wins")
            continue
        values[new] = environ[old]
        warnings.append(f"{old} is deprecated: rename it {new} (the node's spelling)")
    return values, warnings


def celery_settings(broker_url: str, result_backend: str = "", lease_s: float = DEFAULT_LEASE_S) -> dict[str, Any]:
    """Celery configuration for both sides: JSON only, acks_late, prefetch 1, routes per task.

    Messages are acknowledged after the task ran (acks_late) and re-queued if the worker process dies
    (reject_on_worker_lost), so a task may run twice: both tasks are idempotent by design.
    """
    conf: dict[str, Any] = {
        "broker_url": broker_url,
        "result_backend": result_backend or None,
        "task_ignore_result": not result_backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_routes": {ANALYZE_TASK: {"queue": INFERENCE_QUEUE}, FINISH_TASK: {"queue": NODE_QUEUE}},
        "task_default_queue": NODE_QUEUE,
        "broker_connection_retry_on_startup": True,
        # A publish to a dead broker must fail fast: the node keeps the instance queued (outbox) and retries.
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 1.0,
        },
        "worker_hijack_root_logger": False,
    }
    if broker_url.startswith("redis"):
        # Redis emulates priorities with one list per step; 0 is the highest priority.
        conf["broker_transport_options"] = {
            **redis_transport_options(lease_s),
            "socket_connect_timeout": 2,
            "socket_timeout": 10,
        }
    return conf
