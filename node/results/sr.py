"""TID 1500 Measurement Report (Comprehensive SR) of the worker's numbers, one group per SEG segment.

Groups use TID 1411 (VolumetricROIMeasurementsAndQualitativeEvaluations) with a ReferencedSegment:
on these projection images that validated with 0 dciodvfy errors, the planar TID 1410 with
ReferencedSegmentationFrame did not (DESIGN.md toolchain facts).

- right_lung / left_lung: lung area;
- opacity: severity score 0-6, opacity % per lung, the six zone percentages, which zones counted;
- pneumothorax: present/absent, side, area, probability.

Areas are in cm² when the source has ImagerPixelSpacing/PixelSpacing, otherwise in pixels of the
source grid, and the group says so. The numbers are the worker's (AnalyzeResult), not recomputed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from workers.api import AnalyzeResult, ModelInfo

from . import codes
from .common import DeviceInfo, ResultError, experimental_models, not_for_diagnostic_suffix
from .seg import SEGMENTS, segment_numbers

log = logging.getLogger(__name__)

#: Local concepts for what no standard code names (a "99" coding scheme is private by definition, PS3.16 8.2).
LOCAL_SCHEME = "99CXRNODE"
OPACITY_PERCENTAGE = hd.sr.CodedConcept("CXR001", LOCAL_SCHEME, "Opacity percentage of region")
AREA_BASIS = hd.sr.CodedConcept("CXR003", LOCAL_SCHEME, "Area measurement basis")
AREA_IN_PIXELS = hd.sr.CodedConcept("CXR004", LOCAL_SCHEME, "Pixels: source has no pixel spacing")
AREA_IN_CM2 = hd.sr.CodedConcept("CXR005", LOCAL_SCHEME, "Calibrated: source pixel spacing")
DIAGNOSTIC_USE = hd.sr.CodedConcept("CXR006", LOCAL_SCHEME, "Diagnostic use")
NOT_FOR_DIAGNOSTIC_USE = hd.sr.CodedConcept("CXR007", LOCAL_SCHEME, "Not for diagnostic use (experimental model)")
PRIOR_SEVERITY = hd.sr.CodedConcept("CXR021", LOCAL_SCHEME, "Severity score of the prior study")
SEVERITY_CHANGE = hd.sr.CodedConcept("CXR022", LOCAL_SCHEME, "Severity score change from the prior study")
PROBABILITY = hd.sr.CodedConcept(dcm_codes.DCM.Probability.value, "DCM", dcm_codes.DCM.Probability.meaning)

#: zone_fractions order in AnalyzeResult: right upper, middle, lower, left upper, middle, lower.
ZONES: tuple[tuple[hd.sr.CodedConcept, hd.sr.CodedConcept], ...] = tuple(
    (side, zone) for side in (codes.RIGHT, codes.LEFT) for zone in (codes.UPPER_ZONE, codes.MIDDLE_ZONE, codes.LOWER_ZONE))
#: One concept per zone (a code value has one meaning), in ZONES order.
ZONE_COUNTED: tuple[hd.sr.CodedConcept, ...] = tuple(
    hd.sr.CodedConcept(f"CXR1{i}", LOCAL_SCHEME, f"{side.meaning} {zone.meaning.lower()} counted in severity score")
    for i, (side, zone) in enumerate(ZONES, start=1))
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


def build_sr(source: Dataset, seg: Dataset, result: AnalyzeResult, *, pixel_spacing_mm: tuple[float, float] | None,
             device: DeviceInfo, notes: Sequence[str] = (), series_number: int = 9002, instance_number: int = 1,
             series_instance_uid: str | None = None, sop_instance_uid: str | None = None,
             prior: PriorComparison | None = None) -> hd.sr.ComprehensiveSR:
    """Build the TID 1500 report for one analysed image.

    `pixel_spacing_mm` is the (row, column) spacing of the RESULT grid (result.rows x result.cols),
    i.e. `Prepared.prepared_pixel_spacing_mm`, or None when the source has no spacing. `notes` are
    the preparation notes (e.g. 'secondary capture', 'lossy source'), recorded with the algorithm.
    With a `prior`, the opacity group also carries the prior's severity and the change, and the prior
    image is listed in the Pertinent Other Evidence Sequence (its study UID and date travel with it).
    """
    if seg.StudyInstanceUID != source.StudyInstanceUID:
        raise ResultError("the SEG does not belong to the source's study")
    numbers = segment_numbers(seg)
    models = {m.name: m for m in result.models}
    used: dict[str, ModelInfo] = {}  # models whose numbers are in the report
    area = _AreaUnit(pixel_spacing_mm)
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations] = []

    def group(name: str, finding: hd.sr.CodedConcept, sites: Sequence[hd.sr.FindingSite],
              measurements: Sequence[hd.sr.Measurement],
              evaluations: Sequence[hd.sr.QualitativeEvaluation] = ()) -> None:
        model = models.get(SEGMENTS[name].model)
        if name not in numbers or model is None:
            raise ResultError(f"the SEG has no segment {name!r} or the result no model {SEGMENTS[name].model!r}")
        used[model.name] = model
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=SEGMENTS[name].label),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=numbers[name],
                source_images=[hd.sr.SourceImageForSegmentation(source.SOPClassUID, source.SOPInstanceUID)]),
            finding_type=finding,
            finding_sites=list(sites),
            algorithm_id=_algorithm(model, notes),
            measurements=list(measurements),
            qualitative_evaluations=[*evaluations, area.basis(), *_use(model)],
        ))

    if result.lung_area_px is not None:
        for side in ("right", "left"):
            group(f"{side}_lung", codes.LUNG, [hd.sr.FindingSite(codes.LUNG, laterality=SIDES[side])],
                  [area.measurement(result.lung_area_px[side])])
    if result.severity_score is not None:
        group("opacity", codes.OPACITY, [hd.sr.FindingSite(codes.LUNG, laterality=codes.RIGHT_AND_LEFT)],
              _severity_measurements(result) + _comparison(result, prior), _zone_evaluations(result))
    if result.pneumothorax_present is not None:
        group("pneumothorax", codes.PNEUMOTHORAX, [hd.sr.FindingSite(codes.PLEURA, laterality=SIDES.get(
            result.pneumothorax_side or "", codes.RIGHT_AND_LEFT))], *_pneumothorax(result, area))
    if not groups:
        raise ResultError("the result has no numbers to report")

    suffix = not_for_diagnostic_suffix(experimental_models(list(used.values())))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(device),
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
    sr.SeriesDescription = ("AI chest X-ray measurements" + suffix)[:64]
    sr.CodingSchemeIdentificationSequence = [_local_scheme()]
    if prior is not None and prior.sop_instance_uid and result.severity_score is not None:
        sr.PertinentOtherEvidenceSequence = [_evidence(prior)]
    log.info("SR built: %d measurement groups%s", len(groups), suffix)
    return sr


class _AreaUnit:
    """Worker areas are counted on the result grid; the spacing of that grid makes them cm²."""

    def __init__(self, spacing_mm: tuple[float, float] | None) -> None:
        self.cm2_per_pixel = None if spacing_mm is None else spacing_mm[0] * spacing_mm[1] / 100.0

    def measurement(self, pixels: int) -> hd.sr.Measurement:
        if self.cm2_per_pixel is None:
            return hd.sr.Measurement(name=codes.AREA, value=float(pixels), unit=codes.UNIT_PIXELS)
        return hd.sr.Measurement(name=codes.AREA, value=round(pixels * self.cm2_per_pixel, 2), unit=codes.UNIT_CM2)

    def basis(self) -> hd.sr.QualitativeEvaluation:
        return hd.sr.QualitativeEvaluation(AREA_BASIS, AREA_IN_PIXELS if self.cm2_per_pixel is None else AREA_IN_CM2)


def _severity_measurements(result: AnalyzeResult) -> list[hd.sr.Measurement]:
    assert result.severity_score is not None
    if not 0 <= result.severity_score <= 6:
        raise ResultError(f"severity score {result.severity_score} outside 0-6")
    items = [hd.sr.Measurement(name=codes.SEVERITY, value=int(result.severity_score), unit=codes.UNIT_SCORE)]
    for lung, fraction in (result.opacity_fraction or {}).items():
        items.append(hd.sr.Measurement(name=OPACITY_PERCENTAGE, value=_percent(fraction), unit=codes.UNIT_PERCENT,
                                       finding_sites=[hd.sr.FindingSite(codes.LUNG, laterality=SIDES[lung])]))
    fractions = result.zone_fractions or []
    if fractions and len(fractions) != len(ZONES):
        raise ResultError(f"expected {len(ZONES)} zone fractions, got {len(fractions)}")
    for (side, zone), fraction in zip(ZONES, fractions, strict=False):
        items.append(hd.sr.Measurement(name=OPACITY_PERCENTAGE, value=_percent(fraction), unit=codes.UNIT_PERCENT,
                                       finding_sites=[hd.sr.FindingSite(zone, laterality=side)]))
    return items


def _comparison(result: AnalyzeResult, prior: PriorComparison | None) -> list[hd.sr.Measurement]:
    if prior is None or result.severity_score is None:
        return []
    return [hd.sr.Measurement(name=PRIOR_SEVERITY, value=int(prior.severity_score), unit=codes.UNIT_SCORE),
            hd.sr.Measurement(name=SEVERITY_CHANGE, value=int(result.severity_score) - int(prior.severity_score),
                              unit=codes.UNIT_SCORE)]


def _evidence(prior: PriorComparison) -> Dataset:
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
    """Which zones counted towards the score: one Present/Absent per zone, in ZONES order."""
    return [hd.sr.QualitativeEvaluation(name, codes.PRESENT if counted else codes.ABSENT)
            for name, counted in zip(ZONE_COUNTED, result.zone_affected or [], strict=False)]


def _pneumothorax(result: AnalyzeResult, area: _AreaUnit
                  ) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    measurements = [area.measurement(result.pneumothorax_area_px or 0)]
    if result.pneumothorax_probability is not None:
        measurements.append(hd.sr.Measurement(name=PROBABILITY, value=round(float(result.pneumothorax_probability), 4),
                                              unit=codes.UNIT_RATIO))
    evaluations = [hd.sr.QualitativeEvaluation(codes.PNEUMOTHORAX,
                                               codes.PRESENT if result.pneumothorax_present else codes.ABSENT)]
    if result.pneumothorax_present and result.pneumothorax_side in SIDES:
        evaluations.append(hd.sr.QualitativeEvaluation(codes.LATERALITY, SIDES[result.pneumothorax_side]))
    return measurements, evaluations


def _percent(fraction: float) -> float:
    if not 0.0 <= fraction <= 1.0:
        raise ResultError(f"fraction {fraction} outside 0-1")
    return round(100.0 * float(fraction), 2)


def _algorithm(model: ModelInfo, notes: Sequence[str]) -> hd.sr.AlgorithmIdentification:
    parameters = [f"model_card_sha256={model.sha256}", f"architecture={model.architecture}",
                  f"status={model.status}"]
    if model.status != "validated":
        parameters.append("experimental model: NOT FOR DIAGNOSTIC USE")
    parameters += [f"input: {note}" for note in notes]
    return hd.sr.AlgorithmIdentification(name=model.name, version=model.version, parameters=parameters,
                                         family=codes.ARTIFICIAL_INTELLIGENCE, manufacturer="cxr-node")


def _use(model: ModelInfo) -> list[hd.sr.QualitativeEvaluation]:
    """Groups made by an experimental model say so in the content, not only in the series description."""
    if model.status == "validated":
        return []
    return [hd.sr.QualitativeEvaluation(DIAGNOSTIC_USE, NOT_FOR_DIAGNOSTIC_USE)]


def _local_scheme() -> Dataset:
    """Declares the private coding scheme (SOP Common, Coding Scheme Identification Sequence)."""
    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = "cxr-node local concepts"
    item.CodingSchemeResponsibleOrganization = "cxr-node"
    return item


def _observation_context(device: DeviceInfo) -> hd.sr.ObservationContext:
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device.uid, name=device.model_name, manufacturer_name=device.manufacturer,
            model_name=device.model_name, serial_number=device.serial_number)))
