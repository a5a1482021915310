"""`python -m benchmarks [--only ingest|pipeline|worker ...] [--quick] --out bench-results`.

Runs the selected benchmarks one after another, writes ``<out>/<name>.json`` for each and
``<out>/summary.json`` with the headline figures. ``--quick`` is a smoke run (small files, few
images, tiny models) that checks the machinery, not the speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import ingest, pipeline, stow, triage, worker
from benchmarks.common import without_venv_scripts, write_json

log = logging.getLogger("benchmarks")

NAMES = ("ingest", "pipeline", "worker", "triage", "stow")
DEFAULT_CACHE = Path(os.environ.get("CXRNODE_BENCH_CACHE", "/tmp/cxrnode-bench-cache"))


def _ingest(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        return ingest.run(args.out, args.cache, n_files=8, side=256, repeats=1, listener_counts=(2,), profile=False)
    return ingest.run(args.out, args.cache)


def _pipeline(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        return pipeline.run(args.out, args.cache, n_images=3, weights="tiny", paced_interval_s=0.5)
    return pipeline.run(args.out, args.cache, weights=args.weights, worker_threads=args.worker_threads)


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        return worker.run(args.out, args.cache, weights="tiny", repeats=1, backends=("onnx", "torch"))
    return worker.run(args.out, args.cache, weights=args.weights)


def _triage(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        return triage.run(args.out, args.cache, n_studies=2, interval_s=1.0, stable_s=1.0, weights="tiny")
    return triage.run(args.out, args.cache, weights=args.weights)


def _stow(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        return stow.run(args.out, args.cache, n_files=8, side=256, repeats=1, batch=4)
    return stow.run(args.out, args.cache)


RUNNERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "ingest": _ingest,
    "pipeline": _pipeline,
    "worker": _worker,
    "triage": _triage,
    "stow": _stow,
}


def headline(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of each benchmark that go into summary.json."""
    if name == "ingest":
        out = {
            k: data.get(k) for k in ("best_ratio", "goal_met", "ratio_node_to_dcmtk", "node_peak_rss_mb_4_associations")
        }
    elif name == "pipeline":
        out = {"weights": data.get("weights"), "worker_threads": data.get("worker_threads")}
        for phase in ("paced", "burst"):
            p = data.get(phase) or {}
            out[phase] = {k: p.get(k) for k in ("images", "complete", "latency_s", "images_per_minute")}
    elif name == "stow":
        out = {k: data.get(k) for k in ("files", "file_bytes", "summary", "ratio_stow_to_cstore")}
    elif name == "triage":
        out = {
            k: data.get(k)
            for k in (
                "weights",
                "stable_s",
                "acked",
                "last_image_to_hl7_ack_s",
                "reference_received_to_results_acknowledged_s",
                "ratio_ack_to_reference_p50",
            )
        }
    else:
        out = {k: data.get(k) for k in ("weights", "per_model_ms", "cpu_images_per_s", "gpu")}
    cond = data.get("conditions_before") or {}
    out["conditions"] = {
        "loadavg": cond.get("loadavg"),
        "training_running": cond.get("training_running"),
        "time_utc": cond.get("time_utc"),
    }
    dominant = data.get("dominant")
    out["dominant"] = dominant.get("measured") or dominant.get("text") if isinstance(dominant, dict) else dominant
    return out


def previous_summary(out: Path, quick: bool) -> dict[str, Any]:
    """summary.json so far: a run of some benchmarks keeps the others' last headlines (same mode only)."""
    try:
        old = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        old = {}
    if old.get("quick") != quick or not isinstance(old.get("benchmarks"), dict):
        old = {"quick": quick, "benchmarks": {}}
    return old


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the JSON results")
    parser.add_argument("--only", action="append", choices=NAMES, help="run only this benchmark (repeatable)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, checks the machinery only")
    parser.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"where generated data is kept between runs (default {DEFAULT_CACHE})",
    )
    parser.add_argument(
        "--weights",
        choices=("auto", "shipped", "random", "tiny"),
        default="auto",
        help="model weights for pipeline/worker: shipped (workers/weights), random "
        "(full-size architectures, untrained: same speed), tiny; auto = shipped if present",
    )
    parser.add_argument(
        "--worker-threads",
        type=int,
        default=None,
        help="pipeline: intra-op threads of the embedded inference worker (CXRNODE_WORKER_THREADS)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ["PATH"] = without_venv_scripts(os.environ.get("PATH", ""))  # DCMTK's storescp, not pynetdicom's
    selected = args.only or list(NAMES)
    summary = previous_summary(args.out, args.quick)
    status = 0
    for name in selected:
        t0 = time.monotonic()
        log.info("running benchmark %s%s", name, " (quick)" if args.quick else "")
        try:
            data = RUNNERS[name](args)
        except Exception as exc:  # noqa: BLE001 — one failed benchmark is reported, the others still run
            log.error("benchmark %s failed: %s", name, exc)
            data = {"benchmark": name, "error": repr(exc), "traceback": traceback.format_exc()[-4000:]}
            status = 1
        data["quick"] = args.quick
        data["runtime_s"] = round(time.monotonic() - t0, 1)
        path = write_json(args.out, name, data)
        log.info("wrote %s (%.0f s)", path, data["runtime_s"])
        summary["benchmarks"][name] = ({"error": data["error"]} if "error" in data else headline(name, data)) | {
            "runtime_s": data["runtime_s"]
        }
    write_json(args.out, "summary", summary)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
