"""`python -m benchmarks --quick`: the benchmark machinery runs and writes JSON of the documented shape.

Checks shape and bookkeeping only (every file sent was stored, every model was timed), never speed.
The pipeline benchmark needs the whole embedded node with its workers and is left to `make bench`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.__main__ import main

pytestmark = pytest.mark.skipif(shutil.which("storescp") is None, reason="DCMTK is not installed")


@pytest.mark.timeout(180)
def test_quick_ingest_and_worker_write_json(tmp_path: Path) -> None:
    out = tmp_path / "bench-results"
    status = main(
        ["--only", "ingest", "--only", "worker", "--quick", "--out", str(out), "--cache", str(tmp_path / "cache")]
    )

    assert status == 0, (out / "summary.json").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["benchmarks"]) == {"ingest", "worker"}
    assert all("error" not in b for b in summary["benchmarks"].values())

    ingest = json.loads((out / "ingest.json").read_text())
    assert {r["server"] for r in ingest["runs"]} == {
        "dcmtk-storescp",
        "dcmtk-storescp --fork",
        "cxrnode serve (listeners=2)",
    }
    for run in ingest["runs"]:
        assert run["stored"] == run["files"] == 8
        assert run["mb_per_s"] > 0
    for key in ("1_association", "4_associations"):
        assert ingest["ratio_node_to_dcmtk"]["cxrnode serve (listeners=2)"][key]["best"] > 0
    assert ingest["node_peak_rss_mb_4_associations"]["cxrnode serve (listeners=2)"]["rss_sum"] > 0
    assert isinstance(ingest["conditions_before"]["training_running"], bool)

    worker = json.loads((out / "worker.json").read_text())
    assert worker["weights"] == "tiny"
    for backend in ("onnx", "torch"):
        for model in ("lung", "opacity", "pneumothorax"):
            assert set(worker["per_model_ms"][backend][model]) == {"batch1", "batch4"}
        assert worker["results"][backend]["analyze"]["batch4"]["images_per_s"] > 0
    assert worker["results"]["onnx"]["backends"]["lung"] == "onnx-cpu"
    assert "available" in worker["gpu"]


@pytest.mark.timeout(300)
def test_quick_triage_measures_every_study(tmp_path: Path) -> None:
    out = tmp_path / "bench-results"
    status = main(["--only", "triage", "--quick", "--out", str(out), "--cache", str(tmp_path / "cache")])
    assert status == 0, (out / "triage.json").read_text()
    triage = json.loads((out / "triage.json").read_text())
    assert triage["acked"] == triage["studies"] == 2
    assert triage["last_image_to_hl7_ack_s"]["p50"] > 0
    assert triage["reference_received_to_results_acknowledged_s"]["p50"] > 0
    assert triage["node_log_tracebacks"] == {}


@pytest.mark.timeout(300)
def test_quick_stow_compares_both_front_doors(tmp_path: Path) -> None:
    out = tmp_path / "bench-results"
    status = main(["--only", "stow", "--quick", "--out", str(out), "--cache", str(tmp_path / "cache")])
    assert status == 0, (out / "stow.json").read_text()
    stow = json.loads((out / "stow.json").read_text())
    assert {(r["server"], r["associations"]) for r in stow["runs"]} == {
        ("c-store", 1),
        ("c-store", 4),
        ("stow-rs", 1),
        ("stow-rs", 4),
    }
    for run in stow["runs"]:
        assert run["stored"] == run["files"] == 8 and run["mb_per_s"] > 0
    assert stow["ratio_stow_to_cstore"]["1_stream"]["best"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert "ratio_stow_to_cstore" in summary["benchmarks"]["stow"]


def test_dcmtk_tools_are_never_the_venvs_pynetdicom_apps() -> None:
    """pynetdicom puts its own `storescp` etc. into the venv's bin: an activated venv must not swap them in."""
    import os
    import sys

    from benchmarks.common import without_venv_scripts

    scripts = str(Path(sys.prefix) / "bin")
    assert without_venv_scripts(os.pathsep.join([scripts, "/usr/bin", "", "/bin"])) == os.pathsep.join(
        ["/usr/bin", "/bin"]
    )
    found = shutil.which("storescp")  # tests/conftest.py cleaned PATH for the whole session
    assert found is None or Path(found).resolve().parent != Path(scripts).resolve()
