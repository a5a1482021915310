"""The Celery app of the workers: `celery -A workers.tasks worker -Q inference`.

Broker and result backend come from the environment, under the node's own names, so one environment
file configures the node and its workers (the node spawns its embedded worker the same way):

- CXRNODE_BROKER__URL: the node's `[broker] url`, e.g. `redis://host:6379/0`; for the embedded
  broker `cxrnode serve` passes its `sqla+sqlite:///…/broker.db`. Required: a worker without it
  says so and stops (it used to fall back to a local SQLite file and wait forever for work that
  the node was putting on Redis).
- CXRNODE_BROKER__RESULT_BACKEND: default none. Results travel to the node as a `node.finish`
  message, so a backend only adds storage; set one (e.g. the Redis URL) to also keep task results.
- CXRNODE_BROKER__TASK_TIME_LIMIT: hard limit per task in seconds (default 600).
- CXRNODE_BROKER__LEASE_S: Redis only, seconds after which the task of a worker that died as a whole
  runs again on another worker (default 60; the same on every consumer: `workers.api.DEFAULT_LEASE_S`).
- The spellings of earlier releases (CXRNODE_BROKER_URL, CXRNODE_RESULT_BACKEND,
  CXRNODE_TASK_TIME_LIMIT) are still read, with a warning each (`workers.api.DEPRECATED_ENV`).
- Model settings (weights dir, device, threads, models to load): see `workers.runner`.

Reliability follows Celery's advice: tasks are idempotent (pure compute on an opaque job id),
acknowledged late, prefetched one at a time, and re-queued when the process running them dies, so
a killed worker loses no job. The model runner is built once per worker process.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from celery import Celery, signals
from celery.exceptions import Reject

from workers import broker
from workers.api import (
    ANALYZE_TASK,
    BROKER_ENV,
    DEFAULT_LEASE_S,
    FINISH_TASK,
    INFERENCE_QUEUE,
    LEASE_ENV,
    MODEL_NAMES,
    RESULT_BACKEND_ENV,
    TIME_LIMIT_ENV,
    AnalyzeRequest,
    AnalyzeResult,
    broker_environment,
    celery_settings,
    reply_queue_of,
)

log = logging.getLogger(__name__)

ENV_BROKER_RECOVER = "CXRNODE_BROKER_RECOVER"  # "0": do not requeue stranded embedded messages at start
NO_BROKER = (
    f"no broker configured: set {BROKER_ENV} to the node's [broker] url (e.g. redis://host:6379/0; "
    "`cxrnode worker --config FILE` sets it from the node's configuration)"
)


def worker_settings(
    broker_url: str, result_backend: str, time_limit: float, lease_s: float = DEFAULT_LEASE_S
) -> dict[str, Any]:
    """The shared settings (`workers.api.celery_settings`: JSON, acks_late, prefetch 1, routes,
    Redis priorities and leases) plus what only the worker side needs."""
    conf = celery_settings(broker_url, result_backend, lease_s)
    conf.update(
        task_time_limit=time_limit,
        task_soft_time_limit=max(1.0, time_limit - 30),
        # The finish message must get out even through a broker hiccup; if it cannot, the task is
        # requeued (see `analyze`), not lost.
        task_publish_retry_policy={"max_retries": 10, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 3.0},
        worker_send_task_events=False,
        # Each pool process loads (and on first use exports) the models before it reports up; the
        # default 4 s makes Celery kill and respawn a loading process forever on a busy host.
        worker_proc_alive_timeout=300.0,
    )
    # Redis: no visibility timeout longer than the time limit is needed (it used to be an hour, the
    # delay after which a dead worker's task ran again): live workers renew their leases.
    return conf


def make_app(environ: Mapping[str, str] | None = None) -> Celery:
    """The workers' app from the environment. Without a broker the app is still made (importing this
    module must not fail, e.g. for `celery inspect`), and the worker stops at start (see below)."""
    values, warnings = broker_environment(os.environ if environ is None else environ)
    for warning in warnings:
        log.warning("%s", warning)
    broker_url = values.get(BROKER_ENV, "")
    time_limit = float(values.get(TIME_LIMIT_ENV, "600"))
    lease_s = float(values.get(LEASE_ENV, DEFAULT_LEASE_S))
    broker.prepare(broker_url)
    broker.keep_leases(broker_url, lease_s)
    celery = Celery("cxrnode")
    celery.conf.update(worker_settings(broker_url, values.get(RESULT_BACKEND_ENV, ""), time_limit, lease_s))
    if not broker_url:
        celery.conf.broker_url = None
    return celery


app = make_app()

# -- one ModelRunner per worker process ---------------------------------------------------------

_runner: Any = None
_runner_lock = threading.Lock()


def get_runner() -> Any:
    """The process's ModelRunner, built once (at pool-process start, see below) and shared by all
    task threads of the process: with `--pool threads` on a GPU their images are micro-batched."""
    global _runner
    with _runner_lock:
        if _runner is None:
            from workers.runner import ModelRunner

            _runner = ModelRunner()
        return _runner


@signals.worker_init.connect
def _refuse_without_broker(**_: Any) -> None:
    """A worker with no broker would wait on a default broker the node never publishes to: stop."""
    if not app.conf.broker_url:
        log.critical("cannot start the worker: %s", NO_BROKER)
        raise SystemExit(f"cxr-node worker: {NO_BROKER}")


@signals.worker_init.connect
def _check_weights_before_forking(**_: Any) -> None:
    """Fail the whole worker at start, with the reason, when the weights are missing or wrong; then
    requeue embedded-broker messages a dead predecessor left unacknowledged (`workers.broker`).

    Only the cards and sha256 are checked here: torch and ONNX Runtime are loaded in each child, as
    their thread pools must not be forked.
    """
    from workers import models
    from workers.runner import default_weights_dir, models_from_env

    weights_dir = default_weights_dir()
    try:
        for name in models_from_env():
            card = models.read_card(name, weights_dir)
            path = models.weights_path(name, weights_dir)
            if not path.exists():
                raise models.WeightsError(f"weights {path} are missing")
            if models.sha256_file(path) != card.get("sha256"):
                raise models.WeightsError(f"{path}: sha256 does not match its card")
    except (models.WeightsError, ValueError) as exc:
        # Celery logs and ignores exceptions from signal handlers; SystemExit stops the worker.
        log.critical("cannot start the worker: %s", exc)
        raise SystemExit(f"cxr-node worker: {exc}") from exc
    log.info("worker weights verified in %s", weights_dir)
    if os.environ.get(ENV_BROKER_RECOVER, "1") != "0":
        broker.recover_unacked(str(app.conf.broker_url), [INFERENCE_QUEUE])


@signals.worker_process_init.connect
def _load_models_in_child(**_: Any) -> None:
    # Load before the first task arrives, so no job pays the load (and first ONNX export) time.
    get_runner()


@signals.worker_ready.connect
def _load_models_in_threaded_worker(sender: Any = None, **_: Any) -> None:
    # Thread and solo pools run tasks in this process (no pool process to start): load here.
    pool = getattr(sender, "pool", None)
    if pool is not None and type(pool).__module__.rsplit(".", 1)[-1] in ("thread", "solo"):
        get_runner()


# -- tasks --------------------------------------------------------------------------------------


def _error_result(job_id: str, reason: str) -> dict[str, Any]:
    return AnalyzeResult(job_id=job_id, rows=0, cols=0, error=reason).to_message()


def _parse(message: Any) -> AnalyzeRequest:
    if not isinstance(message, dict):
        raise ValueError(f"message must be a JSON object, not {type(message).__name__}")
    request = AnalyzeRequest.from_message(message)
    unknown = set(request.models) - set(MODEL_NAMES)
    if unknown:
        raise ValueError(f"unknown models {sorted(unknown)}")
    request.pixels()  # decodes and checks the declared shape
    return request


@app.task(name=ANALYZE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def analyze(self: Any, message: dict[str, Any]) -> dict[str, Any]:
    """Analyse one prepared image; send the result to the node and return it.

    Idempotent: the same job twice computes the same result twice; the node keeps the first. A
    message that cannot be read is rejected without requeue (a retry cannot fix it) and, when its
    job id is readable, the node is told why.
    """
    from workers.inference import analyze as run_analysis

    job_id = message.get("job_id") if isinstance(message, dict) else None
    try:
        request = _parse(message)
    except Exception as exc:
        reason = f"bad analyze message: {type(exc).__name__}: {exc}"
        log.error("job %s: %s", job_id, reason)
        if job_id is not None:
            self.app.send_task(FINISH_TASK, args=[_error_result(str(job_id), reason)], queue=reply_queue_of(message))
        raise Reject(reason, requeue=False) from exc

    log.info(
        "job %s: analysing (%dx%d, models %s)", request.job_id, request.rows, request.cols, ",".join(request.models)
    )
    try:
        result = run_analysis(request, get_runner()).to_message(request.result_fields)
    except Exception as exc:  # a model failed on this image: report, do not loop
        log.exception("job %s: analysis failed", request.job_id)
        result = _error_result(request.job_id, f"analysis failed: {type(exc).__name__}: {exc}")
    try:
        self.app.send_task(FINISH_TASK, args=[result], queue=request.reply_queue)
    except Exception as exc:  # broker unreachable: run again later rather than lose the result
        log.error("job %s: could not send the result (%s); requeued", request.job_id, exc)
        raise Reject(f"result not delivered: {exc}", requeue=True) from exc
    log.info(
        "job %s: analysed (severity %s, timings %s)",
        request.job_id,
        result.get("severity_score"),
        result.get("timings_ms"),
    )
    return result
