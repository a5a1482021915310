"""From a worker's AnalyzeResult to result files on disk and pending exports in the audit log.

Idempotent by construction: each analysis run of an instance has its own job id
(`<instance id>.<queued timestamp>`) and its own results folder; the files are written atomically and
reused if they exist. The outcome (result files, exports, ``analyzed``) is recorded in one transaction
that first checks, under the instance's row lock, that the run is still the current one: a repeated
or stale result (a task that ran twice, a run superseded by a re-run) never produces a second result
set, and a crash leaves the instance ``queued`` with nothing half-registered.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from node.analysis.decoding import prepare_isolated
from node.analysis.prepare import Geometry, masks_to_source
from node.audit import AuditStore, Instance, InstanceState, NewExport
from node.audit.models import StudyTriage, job_id_for, parse_job_id
from node.results.common import DeviceInfo, read_source_header
from node.results.overlay import build_overlay
from node.results.seg import build_seg
from node.results.sr import PriorComparison, build_sr
from node.runtime.config import Settings
from workers.api import MASK_NAMES, AnalyzeResult, ModelInfo

log = logging.getLogger(__name__)

__all__ = [
    "REPLY_TO_SENDER",
    "ResultFiles",
    "atomic_save",
    "compared_with",
    "device_info",
    "finish_analysis",
    "job_id_for",
    "parse_job_id",
    "published_geometry",
    "recorded_models",
    "result_destinations",
    "run_dir",
    "summary",
]

REPLY_TO_SENDER = "reply-to-sender"


@dataclass(frozen=True)
class ResultFiles:
    seg: Path
    sr: Path
    overlay: Path | None

    def wanted(self, settings: Settings) -> list[tuple[str, Path]]:
        """(kind, path) of the objects to export, as `results` configures."""
        return (
            ([("seg", self.seg)] if settings.results.seg else [])
            + ([("sr", self.sr)] if settings.results.sr else [])
            + ([("overlay", self.overlay)] if self.overlay else [])
        )

    def as_detail(self) -> dict[str, str]:
        return {"seg": str(self.seg), "sr": str(self.sr), **({"overlay": str(self.overlay)} if self.overlay else {})}


def run_dir(settings: Settings, job_id: str) -> Path:
    instance_id, stamp = parse_job_id(job_id)
    return settings.storage.results_dir / str(instance_id) / str(stamp)


def device_info(settings: Settings) -> DeviceInfo:
    from node import __version__

    return DeviceInfo(
        manufacturer=settings.results.manufacturer,
        model_name="cxr-node",
        software_version=__version__,
        serial_number=settings.dicom.ae_title,
    )


def result_destinations(inst: Instance) -> list[str]:
    """Where the results of `inst` go: its routing rule's destinations, the sender for reply-to-sender."""
    return list(dict.fromkeys(inst.calling_ae if d == REPLY_TO_SENDER else d for d in inst.destinations))


def finish_analysis(settings: Settings, store: AuditStore, result: AnalyzeResult) -> str:
    """Handle one worker result; returns what happened ('analyzed', 'stale', 'failed')."""
    instance_id, _ = parse_job_id(result.job_id)
    inst = store.get_instance(instance_id)
    if inst.state != InstanceState.QUEUED or result.job_id != inst.job_id:
        # Checked again, under the row lock, when the outcome is recorded; this early look saves
        # building result files for a run that is over.
        store.record_stale_result(result.job_id)
        return "stale"
    if result.error:
        return _failed(store, result.job_id, f"worker: {result.error}")
    try:
        files = _write_results(settings, store, inst, result)
        destinations = result_destinations(inst)
        exports = [
            NewExport(dest, kind, str(path), _sop_instance_uid(path))
            for dest in destinations
            for kind, path in files.wanted(settings)
        ]
    except Exception as e:
        log.exception("building results for instance %d failed", instance_id)
        return _failed(store, result.job_id, f"building results failed: {e}")
    nothing_to_send = (
        "nothing to send: no destinations for this rule"
        if not destinations
        else "nothing to send: results.seg, results.sr and results.overlay are off"
    )
    recorded = store.record_analysis(
        result.job_id, exports=exports, files=files.as_detail(), detail=summary(result), nothing_to_send=nothing_to_send
    )
    return "analyzed" if recorded is not None else "stale"


def _failed(store: AuditStore, job_id: str, reason: str) -> str:
    return "failed" if store.record_failed_analysis(job_id, reason) is not None else "stale"


def summary(result: AnalyzeResult) -> dict[str, object]:
    """The numbers worth finding in the audit log (and the console) without opening the SR."""
    return {
        "job_id": result.job_id,
        "severity_score": result.severity_score,
        "zone_fractions": result.zone_fractions,
        "opacity_fraction": result.opacity_fraction,
        "pneumothorax_present": result.pneumothorax_present,
        "pneumothorax_probability": result.pneumothorax_probability,
        "pneumothorax_side": result.pneumothorax_side,
        "models": [f"{m.name} {m.version} ({m.status})" for m in result.models],
        # The same, structured: triage reads each model's status (experimental findings raise no level) and
        # names each model in the study summary SR (its weights' sha256 identifies it there, as here).
        "model_cards": [
            {
                "name": m.name,
                "version": m.version,
                "status": m.status,
                "sha256": m.sha256,
                "architecture": m.architecture,
            }
            for m in result.models
        ],
        "timings_ms": result.timings_ms,
        "warnings": result.warnings,
    }


#: How results recorded before `model_cards` existed name a model: "name version (status)".
_MODEL_STRING = re.compile(r"^(?P<name>\S+) (?P<version>\S+) \((?P<status>\w+)\)$")


def recorded_models(detail: dict[str, Any]) -> list[ModelInfo]:
    """The models of one analysis as :func:`summary` recorded them in its ``instance.analyzed`` event
    (older records: no weights sha256 or architecture)."""
    cards = detail.get("model_cards")
    if isinstance(cards, list):
        return [
            ModelInfo(
                str(c["name"]),
                str(c["version"]),
                str(c.get("sha256", "")),
                str(c["status"]),
                str(c.get("architecture", "")),
            )
            for c in cards
        ]
    parsed = [_MODEL_STRING.match(str(m)) for m in detail.get("models") or []]
    return [ModelInfo(m["name"], m["version"], "", m["status"], "") for m in parsed if m]


def _write_results(settings: Settings, store: AuditStore, inst: Instance, result: AnalyzeResult) -> ResultFiles:
    folder = run_dir(settings, result.job_id)
    folder.mkdir(parents=True, exist_ok=True)
    seg_path, sr_path = folder / "seg.dcm", folder / "sr.dcm"
    overlay_path = folder / "overlay.dcm" if settings.results.overlay else None
    if seg_path.exists() and sr_path.exists() and (overlay_path is None or overlay_path.exists()):
        return ResultFiles(seg_path, sr_path, overlay_path)  # a re-delivered result: files already made

    geometry = published_geometry(inst, result.job_id)
    pixels = None
    if geometry is None or overlay_path is not None:
        # A job published before the geometry was kept, or an overlay (drawn on the prepared picture).
        prepared = prepare_isolated(settings, inst.spool_path)
        geometry, pixels = prepared.geometry, prepared.pixels
    # The header is all SEG and SR take from the source: its pixels are neither read nor decoded here.
    source = read_source_header(inst.spool_path)
    if (result.rows, result.cols) != (geometry.rows, geometry.cols):
        raise ValueError(f"result grid {(result.rows, result.cols)} != prepared grid {(geometry.rows, geometry.cols)}")
    small = {name: m for name in MASK_NAMES if (m := result.mask(name)) is not None}
    masks = {name: masks_to_source(m, geometry) for name, m in small.items()}
    device = device_info(settings)
    started = analysis_started(result)
    seg = build_seg(source, masks, result.models, device=device, started=started)
    sr = build_sr(
        source,
        seg,
        result,
        pixel_spacing_mm=geometry.prepared_pixel_spacing_mm,
        device=device,
        notes=geometry.notes,
        prior=prior_comparison(store, inst, source),
        started=started,
    )
    atomic_save(seg, seg_path)
    atomic_save(sr, sr_path)
    if overlay_path is not None and pixels is not None:
        overlay = build_overlay(
            source, pixels, small, result.models, device=device, pixel_spacing_mm=geometry.prepared_pixel_spacing_mm
        )
        atomic_save(overlay, overlay_path)
    log.info("results for %s written to %s", result.job_id, folder)
    return ResultFiles(seg_path, sr_path, overlay_path)


def analysis_started(result: AnalyzeResult) -> datetime | None:
    """When the analysis started: the worker's clock, else (an older worker) when the node queued the run."""
    started = result.started()
    if started is not None:
        return started
    _, stamp = parse_job_id(result.job_id)
    return datetime.fromtimestamp(stamp / 1000, UTC) if stamp else None


def prior_comparison(store: AuditStore, inst: Instance, source: Dataset) -> PriorComparison | None:
    """The patient's last prior decided by triage (same Patient ID and issuer, an earlier study), which
    the SR compares against; the triage decision of this study finds the same one."""
    prior = store.find_prior(
        study_id=inst.study_id or 0,
        patient_id=str(source.get("PatientID", "") or ""),
        issuer=str(source.get("IssuerOfPatientID", "") or ""),
        study_date=str(source.get("StudyDate", "") or "")[:8],
    )
    return compared_with(store, prior) if prior is not None else None


def compared_with(store: AuditStore, prior: StudyTriage) -> PriorComparison | None:
    """A prior's decision as an SR compares against it: its severity and the image that has it."""
    if prior.severity_score is None:
        return None
    image = store.find_live_instance(str(prior.summary.get("severity_sop_instance_uid") or ""))
    return PriorComparison(
        study_instance_uid=store.study_uid(prior.study_id),
        study_date=prior.study_date,
        severity_score=prior.severity_score,
        series_instance_uid=image.series_instance_uid if image else "",
        sop_class_uid=image.sop_class_uid if image else "",
        sop_instance_uid=image.sop_instance_uid if image else "",
    )


def published_geometry(inst: Instance, job_id: str) -> Geometry | None:
    """The geometry `node.analysis.outbox` kept when it published run `job_id`, if it did."""
    stored = inst.prepared_geometry
    if not stored or stored.get("job_id") != job_id:
        return None
    try:
        return Geometry.from_json(stored)
    except ValueError as e:
        log.warning("instance %d: ignoring the stored geometry (%s); preparing the source again", inst.id, e)
        return None


def _sop_instance_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def atomic_save(ds: Dataset, path: Path) -> None:
    """Write `ds` to `path` so that a reader (or a crash) never sees half a file."""
    tmp = path.with_suffix(".tmp")
    ds.save_as(tmp, enforce_file_format=True)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
