"""TID 1500 Measurement Report (Comprehensive SR) of the worker's numbers, one group per SEG segment.

Groups use TID 1411 (VolumetricROIMeasurementsAndQualitativeEvaluations) with a ReferencedSegment:
on these projection images that validated with 0 dciodvfy errors, the planar TID 1410 with
ReferencedSegmentationFrame did not (DESIGN.md toolchain facts). Each group carries the TID 4019
Algorithm Identification of its model, and the Tracking Identifier/UID of its finding: the same UID as
the SEG segment of that finding. The observer is the node (device observer context, TID 1004).

- right_lung / left_lung: lung Area (SCT 42798000);
- opacity: Severity (SCT 246112005) 0-6, opacity Extent (SCT 260858005, %) per lung and per zone,
  and per zone Opacity (DCM 112001) Present/Absent = whether that zone counted towards the score;
- pneumothorax: Pneumothorax Present/Absent, Laterality, Area, Probability (DCM 122157);
- groups of experimental models: a Comment (DCM 121106) "NOT FOR DIAGNOSTIC USE: made by an
  experimental model";
- with a prior study: a TID 1501 group with the prior's Severity at its own time point (TID 1502).

Areas are in cm² when the source has ImagerPixelSpacing/PixelSpacing, otherwise in {pixels} of the
source grid (the unit says which). Only standard codes are used (DCM, SCT, UCUM, UMLS), declared with their
UIDs in the Coding Scheme Identification Sequence. The numbers are the worker's (AnalyzeResult).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from workers.api import AnalyzeResult, ModelInfo

from . import codes
from .common import (
    NOT_FOR_DIAGNOSTIC_USE,
    DeviceInfo,
    ResultError,
    experimental_models,
    not_for_diagnostic_suffix,
    set_content_datetime,
    set_contributing_equipment,
)
from .seg import SEGMENTS, segment_numbers, tracking_uids

log = logging.getLogger(__name__)

#: How much of a region the opacity covers, in percent of the region's area (per lung, per zone).
OPACITY_PERCENTAGE = hd.sr.CodedConcept("260858005", "SCT", "Extent")
PROBABILITY = hd.sr.CodedConcept(dcm_codes.DCM.Probability.value, "DCM", dcm_codes.DCM.Probability.meaning)
COMMENT = hd.sr.CodedConcept(dcm_codes.DCM.Comment.value, "DCM", dcm_codes.DCM.Comment.meaning)
#: The Comment of every group an experimental model made.
EXPERIMENTAL_COMMENT = f"{NOT_FOR_DIAGNOSTIC_USE}: made by an experimental model"
#: Time point of the prior study's group (TID 1502).
PRIOR_TIME_POINT = "prior study"

#: zone_fractions order in AnalyzeResult: right upper, middle, lower, left upper, middle, lower.
ZONES: tuple[tuple[hd.sr.CodedConcept, hd.sr.CodedConcept], ...] = tuple(
    (side, zone)
    for side in (codes.RIGHT, codes.LEFT)
    for zone in (codes.UPPER_ZONE, codes.MIDDLE_ZONE, codes.LOWER_ZONE)
)
SIDES = {"right": codes.RIGHT, "left": codes.LEFT, "both": codes.RIGHT_AND_LEFT}


@dataclass(frozen=True)
class PriorComparison:
    """The patient's last prior analysed by the node (node.triage), and the image it was scored on."""

    study_instance_uid: str
    study_date: str  # DA or ""
    severity_score: int
    series_instance_uid: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""


def build_sr(
    source: Dataset,
    seg: Dataset,
    result: AnalyzeResult,
    *,
    pixel_spacing_mm: tuple[float, float] | None,
    device: DeviceInfo,
    notes: Sequence[str] = (),
    series_number: int = 9002,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    prior: PriorComparison | None = None,
    started: datetime | None = None,
) -> hd.sr.ComprehensiveSR:
    """Build the TID 1500 report for one analysed image.

    `pixel_spacing_mm` is the (row, column) spacing of the RESULT grid (result.rows x result.cols),
    i.e. `Prepared.prepared_pixel_spacing_mm`, or None when the source has no spacing. `notes` are
    the preparation notes (e.g. 'secondary capture', 'lossy source'), recorded with the algorithm.
    With a `prior`, the opacity group also carries the prior's severity and the change, and the prior
    image is listed in the Pertinent Other Evidence Sequence (its study UID and date travel with it).
    `started` (when the analysis started) becomes the Content Date/Time, as in the SEG.
    """
    if seg.StudyInstanceUID != source.StudyInstanceUID:
        raise ResultError("the SEG does not belong to the source's study")
    numbers = segment_numbers(seg)
    tracking = tracking_uids(seg)
    models = {m.name: m for m in result.models}
    used: dict[str, ModelInfo] = {}  # models whose numbers are in the report
    area = _AreaUnit(pixel_spacing_mm)
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []

    def group(
        name: str,
        finding: hd.sr.CodedConcept,
        sites: Sequence[hd.sr.FindingSite],
        measurements: Sequence[hd.sr.Measurement],
        evaluations: Sequence[hd.sr.QualitativeEvaluation] = (),
    ) -> None:
        model = models.get(SEGMENTS[name].model)
        if name not in numbers or model is None:
            raise ResultError(f"the SEG has no segment {name!r} or the result no model {SEGMENTS[name].model!r}")
        used[model.name] = model
        made = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=tracking.get(name) or hd.UID(), identifier=SEGMENTS[name].label
            ),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=numbers[name],
                source_images=[hd.sr.SourceImageForSegmentation(source.SOPClassUID, source.SOPInstanceUID)],
            ),
            finding_type=finding,
            finding_sites=list(sites),
            algorithm_id=model_algorithm(model, notes),
            measurements=list(measurements),
            qualitative_evaluations=list(evaluations),
        )
        if model.status != "validated":
            # Groups made by an experimental model say so in the content, not only in the series description.
            made[0].ContentSequence.append(
                hd.sr.TextContentItem(COMMENT, EXPERIMENTAL_COMMENT, hd.sr.RelationshipTypeValues.CONTAINS)
            )
        groups.append(made)

    if result.lung_area_px is not None:
        for side in ("right", "left"):
            group(
                f"{side}_lung",
                codes.LUNG,
                [hd.sr.FindingSite(codes.LUNG, laterality=SIDES[side])],
                [area.measurement(result.lung_area_px[side])],
            )
    if result.severity_score is not None:
        group(
            "opacity",
            codes.OPACITY,
            [hd.sr.FindingSite(codes.LUNG, laterality=codes.RIGHT_AND_LEFT)],
            _severity_measurements(result),
            _zone_evaluations(result),
        )
        if prior is not None:
            groups.append(prior_group(prior))
    if result.pneumothorax_present is not None:
        group(
            "pneumothorax",
            codes.PNEUMOTHORAX,
            [
                hd.sr.FindingSite(
                    codes.PLEURA, laterality=SIDES.get(result.pneumothorax_side or "", codes.RIGHT_AND_LEFT)
                )
            ],
            *_pneumothorax(result, area),
        )
    if not groups:
        raise ResultError("the result has no numbers to report")

    suffix = not_for_diagnostic_suffix(experimental_models(list(used.values())))
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(device),
        procedure_reported=codes.CHEST_XRAY,
        imaging_measurements=groups,
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[source, seg],
        content=report,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=instance_number,
        manufacturer=device.manufacturer,
        institution_name=device.institution_name,
        is_complete=True,
        is_final=True,
        is_verified=False,  # nobody has read it: VerificationFlag UNVERIFIED
    )
    complete_report(
        sr,
        description="AI chest X-ray measurements" + suffix,
        models=list(used.values()),
        device=device,
        moment=started,
        prior=prior if result.severity_score is not None else None,
    )
    log.info("SR built: %d measurement groups%s", len(groups), suffix)
    return sr


def complete_report(
    sr: hd.sr.ComprehensiveSR,
    *,
    description: str,
    models: Sequence[ModelInfo],
    device: DeviceInfo,
    moment: datetime | None,
    prior: PriorComparison | None,
) -> None:
    """What every SR the node makes sets once highdicom has built it: the series description, the coding
    schemes it uses, one Contributing Equipment item per model (IHE AIR; none named: highdicom's own
    items stay), Content Date/Time = `moment`, and the prior image it compares against."""
    sr.SeriesDescription = description[:64]
    sr.CodingSchemeIdentificationSequence = coding_schemes(sr)
    if models:
        set_contributing_equipment(sr, models, device, moment)
    set_content_datetime(sr, moment)
    if prior is not None and prior.sop_instance_uid:
        sr.PertinentOtherEvidenceSequence = [prior_evidence(prior)]


class _AreaUnit:
    """Worker areas are counted on the result grid; the spacing of that grid makes them cm²."""

    def __init__(self, spacing_mm: tuple[float, float] | None) -> None:
        self.cm2_per_pixel = None if spacing_mm is None else spacing_mm[0] * spacing_mm[1] / 100.0

    def measurement(self, pixels: int) -> hd.sr.Measurement:
        if self.cm2_per_pixel is None:
            return hd.sr.Measurement(name=codes.AREA, value=float(pixels), unit=codes.UNIT_PIXELS)
        return hd.sr.Measurement(name=codes.AREA, value=round(pixels * self.cm2_per_pixel, 2), unit=codes.UNIT_CM2)


def _severity_measurements(result: AnalyzeResult) -> list[hd.sr.Measurement]:
    assert result.severity_score is not None
    if not 0 <= result.severity_score <= 6:
        raise ResultError(f"severity score {result.severity_score} outside 0-6")
    items = [hd.sr.Measurement(name=codes.SEVERITY, value=int(result.severity_score), unit=codes.UNIT_SCORE)]
    for lung, fraction in (result.opacity_fraction or {}).items():
        items.append(
            hd.sr.Measurement(
                name=OPACITY_PERCENTAGE,
                value=_percent(fraction),
                unit=codes.UNIT_PERCENT,
                finding_sites=[hd.sr.FindingSite(codes.LUNG, laterality=SIDES[lung])],
            )
        )
    fractions = result.zone_fractions or []
    if fractions and len(fractions) != len(ZONES):
        raise ResultError(f"expected {len(ZONES)} zone fractions, got {len(fractions)}")
    for (side, zone), fraction in zip(ZONES, fractions, strict=False):
        items.append(
            hd.sr.Measurement(
                name=OPACITY_PERCENTAGE,
                value=_percent(fraction),
                unit=codes.UNIT_PERCENT,
                finding_sites=[hd.sr.FindingSite(zone, laterality=side)],
            )
        )
    return items


def prior_group(prior: PriorComparison) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of the prior study's severity, at its own time point (TID 1502): the change is the
    difference of the two Severity values; the prior image is in the Pertinent Other Evidence Sequence."""
    when = (
        f"{prior.study_date[:4]}-{prior.study_date[4:6]}-{prior.study_date[6:8]}"
        if len(prior.study_date) >= 8
        else "date unknown"
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"Severity of the prior study ({when})"),
        time_point_context=hd.sr.TimePointContext(time_point=f"{PRIOR_TIME_POINT} {when}"),
        finding_type=codes.OPACITY,
        finding_sites=[hd.sr.FindingSite(codes.LUNG, laterality=codes.RIGHT_AND_LEFT)],
        measurements=[hd.sr.Measurement(name=codes.SEVERITY, value=int(prior.severity_score), unit=codes.UNIT_SCORE)],
    )


def prior_evidence(prior: PriorComparison) -> Dataset:
    """One Hierarchical SOP Instance Reference item (study > series > instance) for the prior image."""
    instance = Dataset()
    instance.ReferencedSOPClassUID = prior.sop_class_uid
    instance.ReferencedSOPInstanceUID = prior.sop_instance_uid
    series = Dataset()
    series.SeriesInstanceUID = prior.series_instance_uid
    series.ReferencedSOPSequence = [instance]
    study = Dataset()
    study.StudyInstanceUID = prior.study_instance_uid
    study.ReferencedSeriesSequence = [series]
    return study


def _zone_evaluations(result: AnalyzeResult) -> list[hd.sr.QualitativeEvaluation]:
    """Which zones counted towards the score: Opacity Present/Absent with the zone as its finding site,
    in ZONES order (a zone counts when its opacity extent passed the threshold in the algorithm parameters)."""
    evaluations = []
    for (side, zone), counted in zip(ZONES, result.zone_affected or [], strict=False):
        evaluation = hd.sr.QualitativeEvaluation(codes.OPACITY, codes.PRESENT if counted else codes.ABSENT)
        evaluation[0].ContentSequence = hd.sr.ContentSequence([hd.sr.FindingSite(zone, laterality=side)])
        evaluations.append(evaluation)
    return evaluations


def _pneumothorax(
    result: AnalyzeResult, area: _AreaUnit
) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    measurements = [area.measurement(result.pneumothorax_area_px or 0)]
    if result.pneumothorax_probability is not None:
        measurements.append(
            hd.sr.Measurement(
                name=PROBABILITY, value=round(float(result.pneumothorax_probability), 4), unit=codes.UNIT_RATIO
            )
        )
    evaluations = [
        hd.sr.QualitativeEvaluation(codes.PNEUMOTHORAX, codes.PRESENT if result.pneumothorax_present else codes.ABSENT)
    ]
    if result.pneumothorax_present and result.pneumothorax_side in SIDES:
        evaluations.append(hd.sr.QualitativeEvaluation(codes.LATERALITY, SIDES[result.pneumothorax_side]))
    return measurements, evaluations


def _percent(fraction: float) -> float:
    if not 0.0 <= fraction <= 1.0:
        raise ResultError(f"fraction {fraction} outside 0-1")
    return round(100.0 * float(fraction), 2)


def model_algorithm(model: ModelInfo, notes: Sequence[str]) -> hd.sr.AlgorithmIdentification:
    parameters = [f"model_card_sha256={model.sha256}", f"architecture={model.architecture}", f"status={model.status}"]
    if model.status != "validated":
        parameters.append("experimental model: NOT FOR DIAGNOSTIC USE")
    if model.performance:
        parameters.append(f"held-out performance: {model.performance}")
    parameters += [f"input: {note}" for note in notes]
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=parameters,
        family=codes.ARTIFICIAL_INTELLIGENCE,
        manufacturer="cxr-node",
    )


#: Coding Scheme Identification (SOP Common) of the schemes the SR uses: designator -> (UID, name).
CODING_SCHEMES: dict[str, tuple[str, str]] = {
    "DCM": ("1.2.840.10008.2.16.4", "DICOM Controlled Terminology"),
    "SCT": ("2.16.840.1.113883.6.96", "SNOMED CT"),
    "UCUM": ("2.16.840.1.113883.6.8", "Unified Code for Units of Measure"),
    "UMLS": ("2.16.840.1.113883.6.86", "Unified Medical Language System"),  # TID 1502 Time Point
}


def coding_schemes(ds: Dataset) -> list[Dataset]:
    """Coding Scheme Identification Sequence items for every scheme the object uses that has a known UID.

    Only standard schemes are used (no private "99" scheme: dciodvfy knows a fixed list of designators
    and warns on every other, declared or not); 99IHE, IHE's own, is known to validators by name.
    """
    used = {str(e.value) for e in ds.iterall() if e.keyword == "CodingSchemeDesignator"}
    items = []
    for designator in sorted(used & set(CODING_SCHEMES)):
        uid, name = CODING_SCHEMES[designator]
        item = Dataset()
        item.CodingSchemeDesignator = designator
        item.CodingSchemeUID = uid
        item.CodingSchemeName = name
        items.append(item)
    return items


def observation_context(device: DeviceInfo) -> hd.sr.ObservationContext:
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=dcm_codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device.uid,
                name=device.model_name,
                manufacturer_name=device.manufacturer,
                model_name=device.model_name,
                serial_number=device.serial_number,
            ),
        )
    )
