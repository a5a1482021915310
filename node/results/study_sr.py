"""The study summary SR: one TID 1500 report per triage revision of a study, replacing the one before.

The per-image SRs say what each image shows; whoever reads the worklist, and the RIS behind it, want the
study's answer in one object: the worst severity and the image it is on, the pneumothorax finding and
its image, the change against the patient's prior, and the triage level with the rules that set it.
A late image decides the study again (node.triage.engine): the new revision's report lists the one it
replaces in the Predecessor Documents Sequence (SR Document General, PS3.3 C.17.2), in the same series with Instance
Number = revision, so a PACS shows the newest and keeps the history; each finding keeps its Tracking
UID across revisions.

Groups are TID 1501 (no segment or region: the numbers are the study's, taken from the images' results),
each measurement naming its source image (TID 300 "Source of measurement"): severity (SCT 246112005)
with the opacity model's Algorithm Identification; the prior's severity at its own time point (TID
1502), as the per-image SR has it; pneumothorax Probability, Present/Absent and Laterality; and the
triage group: the level and each reason as Comments, made by the node's rules (its own Algorithm
Identification). Findings of experimental models carry the "NOT FOR DIAGNOSTIC USE" Comment, as in the
per-image SR, and so does the Series Description.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage

from workers.api import ModelInfo

from . import codes
from .common import (
    DeviceInfo,
    ResultError,
    experimental_models,
    not_for_diagnostic_suffix,
    stable_uid,
)
from .sr import (
    COMMENT,
    EXPERIMENTAL_COMMENT,
    PROBABILITY,
    SIDES,
    PriorComparison,
    complete_report,
    model_algorithm,
    observation_context,
    prior_group,
)

log = logging.getLogger(__name__)

SERIES_NUMBER = 9003
SERIES_DESCRIPTION = "AI chest X-ray study summary"
TRIAGE_ALGORITHM = "cxr-node triage rules"


@dataclass(frozen=True)
class ImageRef:
    """One analysed image of the study (from the audit log: the image itself may be on another node)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str


@dataclass(frozen=True)
class StudySummary:
    """What triage decided for one revision of a study, with the images and models behind each finding."""

    revision: int
    level: str
    reasons: Sequence[str]
    images: Sequence[ImageRef]  # every analysed image of the study (the report's evidence)
    severity_score: int | None = None
    severity_image: ImageRef | None = None
    severity_models: Sequence[ModelInfo] = ()
    prior: PriorComparison | None = None
    pneumothorax_present: bool | None = None
    pneumothorax_probability: float | None = None
    pneumothorax_side: str | None = None
    pneumothorax_image: ImageRef | None = None
    pneumothorax_models: Sequence[ModelInfo] = ()
    rules: Sequence[str] = field(default_factory=list)  # the triage rules in force, as parameters


@dataclass(frozen=True)
class ReportRef:
    """An SR the node issued earlier for the same study (the one the new revision replaces)."""

    series_instance_uid: str
    sop_instance_uid: str


def build_study_sr(
    header: Dataset,
    summary: StudySummary,
    *,
    device: DeviceInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    replaces: ReportRef | None = None,
    decided: datetime | None = None,
) -> hd.sr.ComprehensiveSR:
    """Build revision `summary.revision` of the study summary report.

    `header` is a source image of the study (its patient and study modules are copied); `replaces` is
    the previous revision's report; `decided` (when triage decided) becomes the Content Date/Time.
    """
    study_uid = str(header.StudyInstanceUID)
    _check(summary)
    used: dict[str, ModelInfo] = {}  # models whose findings are in the report
    groups = _finding_groups(summary, study_uid, used)
    groups.append(_triage_group(summary, _tracking(study_uid, "triage", "Triage of the study"), device))

    # The series says it when any group does (an experimental model, or one whose status was not recorded).
    flagged = [g for g in groups if any(i.get("TextValue") == EXPERIMENTAL_COMMENT for i in g[0].ContentSequence)]
    suffix = not_for_diagnostic_suffix(experimental_models(list(used.values())) or ["unknown"] * len(flagged))
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(device),
        procedure_reported=codes.CHEST_XRAY,
        imaging_measurements=groups,
    )
    evidence = [
        header,
        *(_dataset(i, study_uid) for i in summary.images if i.sop_instance_uid != header.SOPInstanceUID),
    ]
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=summary.revision,
        manufacturer=device.manufacturer,
        institution_name=device.institution_name,
        is_complete=True,
        is_final=True,
        is_verified=False,  # nobody has read it
        previous_versions=[_dataset(_report_image(replaces), study_uid)] if replaces is not None else None,
    )
    complete_report(
        sr,
        description=SERIES_DESCRIPTION + suffix,
        # Results recorded before model cards carried the weights' sha256 cannot name the trained model.
        models=[m for m in used.values() if m.sha256],
        device=device,
        moment=decided,
        prior=summary.prior if summary.severity_score is not None else None,
    )
    log.info(
        "study summary SR built: revision %d, %s, %d group(s)%s", summary.revision, summary.level, len(groups), suffix
    )
    return sr


def _check(summary: StudySummary) -> None:
    if summary.revision < 1:
        raise ResultError(f"revision {summary.revision}: revisions count from 1")
    if not summary.images:
        raise ResultError("a study summary needs at least one analysed image")
    known = {i.sop_instance_uid for i in summary.images}
    for image in (summary.severity_image, summary.pneumothorax_image):
        if image is not None and image.sop_instance_uid not in known:
            raise ResultError(f"image {image.sop_instance_uid} is not among the study's analysed images")
    if summary.severity_score is not None and (summary.severity_image is None or not 0 <= summary.severity_score <= 6):
        raise ResultError(f"severity {summary.severity_score} needs its image and a value in 0-6")
    if summary.pneumothorax_present is not None and summary.pneumothorax_image is None:
        raise ResultError("a pneumothorax finding needs its image")


def _tracking(study_uid: str, finding: str, label: str) -> hd.sr.TrackingIdentifier:
    """The same finding of the same study keeps its Tracking UID across revisions."""
    return hd.sr.TrackingIdentifier(uid=stable_uid("study-summary", study_uid, finding), identifier=label)


def _finding_groups(
    summary: StudySummary, study_uid: str, used: dict[str, ModelInfo]
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """Severity (with the prior's at its time point) and pneumothorax, each with its source image."""
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    if summary.severity_score is not None and summary.severity_image is not None:
        severity = hd.sr.Measurement(
            name=codes.SEVERITY,
            value=int(summary.severity_score),
            unit=codes.UNIT_SCORE,
            referenced_images=[_source(summary.severity_image)],
        )
        groups.append(
            _group(
                _tracking(study_uid, "severity", "Worst opacity severity of the study"),
                codes.OPACITY,
                [hd.sr.FindingSite(codes.LUNG, laterality=codes.RIGHT_AND_LEFT)],
                [severity],
                [],
                _model(summary.severity_models, "opacity", used),
            )
        )
        if summary.prior is not None:
            groups.append(prior_group(summary.prior))
    if summary.pneumothorax_present is not None and summary.pneumothorax_image is not None:
        measurements = []
        if summary.pneumothorax_probability is not None:
            measurements.append(
                hd.sr.Measurement(
                    name=PROBABILITY,
                    value=round(float(summary.pneumothorax_probability), 4),
                    unit=codes.UNIT_RATIO,
                    referenced_images=[_source(summary.pneumothorax_image)],
                )
            )
        present = codes.PRESENT if summary.pneumothorax_present else codes.ABSENT
        evaluations = [hd.sr.QualitativeEvaluation(codes.PNEUMOTHORAX, present)]
        if summary.pneumothorax_present and summary.pneumothorax_side in SIDES:
            evaluations.append(hd.sr.QualitativeEvaluation(codes.LATERALITY, SIDES[summary.pneumothorax_side]))
        side = SIDES.get(summary.pneumothorax_side or "", codes.RIGHT_AND_LEFT)
        groups.append(
            _group(
                _tracking(study_uid, "pneumothorax", "Pneumothorax of the study"),
                codes.PNEUMOTHORAX,
                [hd.sr.FindingSite(codes.PLEURA, laterality=side)],
                measurements,
                evaluations,
                _model(summary.pneumothorax_models, "pneumothorax", used),
            )
        )
    return groups


def _group(
    tracking: hd.sr.TrackingIdentifier,
    finding: hd.sr.CodedConcept,
    sites: Sequence[hd.sr.FindingSite],
    measurements: Sequence[hd.sr.Measurement],
    evaluations: Sequence[hd.sr.QualitativeEvaluation],
    model: ModelInfo | None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=finding,
        finding_sites=list(sites),
        algorithm_id=model_algorithm(model, ()) if model is not None else None,
        measurements=list(measurements),
        qualitative_evaluations=list(evaluations),
    )
    if model is None or model.status != "validated":
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(COMMENT, EXPERIMENTAL_COMMENT, hd.sr.RelationshipTypeValues.CONTAINS)
        )
    return group


def _triage_group(
    summary: StudySummary, tracking: hd.sr.TrackingIdentifier, device: DeviceInfo
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The level and why, as Comments; the rules in force are the parameters of the node's algorithm."""
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=TRIAGE_ALGORITHM,
            version=device.software_version,
            parameters=list(summary.rules) or None,
            manufacturer="cxr-node",
        ),
    )
    lines = [f"Triage level: {summary.level} (revision {summary.revision})"]
    lines += [f"Reason: {reason}" for reason in summary.reasons]
    for line in lines:
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(COMMENT, line[:1024], hd.sr.RelationshipTypeValues.CONTAINS)
        )
    return group


def _model(models: Sequence[ModelInfo], name: str, used: dict[str, ModelInfo]) -> ModelInfo | None:
    """The model called `name` among those behind a finding (recorded as used), else None."""
    model = next((m for m in models if m.name == name), None)
    if model is not None:
        used[model.name] = model
    return model


def _source(image: ImageRef) -> hd.sr.SourceImageForMeasurement:
    return hd.sr.SourceImageForMeasurement(image.sop_class_uid, image.sop_instance_uid)


def _report_image(report: ReportRef) -> ImageRef:
    return ImageRef(str(ComprehensiveSRStorage), report.sop_instance_uid, report.series_instance_uid)


def _dataset(image: ImageRef, study_uid: str) -> Dataset:
    """The four UIDs highdicom reads from an evidence or predecessor data set."""
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = image.series_instance_uid
    ds.SOPClassUID = image.sop_class_uid
    ds.SOPInstanceUID = image.sop_instance_uid
    return ds
