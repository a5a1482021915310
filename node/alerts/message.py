"""What one triage alert says, whatever carries it (HL7 v2 ORU, FHIR DiagnosticReport, webhook JSON).

The triage engine fills one :class:`TriageAlert` per study result that must be told to someone; each
destination type (``node.alerts.hl7``, ``node.alerts.fhir``, ``node.alerts.webhook``) only renders and
delivers it. Keeping the content in one plain, JSON-round-trippable object means the alert row in the
audit log holds exactly what was sent, a retry sends the same thing, and the three formats cannot
drift apart on what a finding is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

TriageLevel = Literal["critical", "urgent", "routine"]
TRIAGE_LEVELS: tuple[TriageLevel, ...] = ("critical", "urgent", "routine")  # most to least pressing

NOT_FOR_DIAGNOSTIC_USE = (
    "Not for diagnostic use: produced by experimental AI models; a radiologist must read the images."
)


@dataclass(frozen=True)
class AlertModel:
    """One model that contributed to the result."""

    name: str
    version: str
    status: str  # "validated" | "experimental"


@dataclass(frozen=True)
class Prior:
    """The patient's most recent earlier analysed study in the node's store."""

    study_instance_uid: str
    study_date: str  # DICOM DA (YYYYMMDD) or ""
    severity_score: int | None


@dataclass(frozen=True)
class TriageAlert:
    """The content of one alert. ``alert_id`` is unique and stable across retries (message control id)."""

    alert_id: str
    created_at: str  # ISO 8601 UTC, when the triage decision was made
    level: TriageLevel
    reasons: list[str]  # human-readable, e.g. "pneumothorax probability 0.91 >= 0.8"
    study_instance_uid: str
    accession_number: str
    revision: int  # 1 for the first result of the study, +1 each time a late image updates it
    # Findings (None = not measured: model off or no analysable image).
    severity_score: int | None = None  # 0-6 zones
    severity_change: int | None = None  # against the prior, when there is one
    prior: Prior | None = None
    pneumothorax_present: bool | None = None
    pneumothorax_probability: float | None = None
    pneumothorax_side: str | None = None  # "right" | "left" | "both" | None
    source_sop_instance_uid: str = ""  # the image the worst finding came from
    source_series_instance_uid: str = ""
    models: list[AlertModel] = field(default_factory=list)
    experimental: bool = False  # any contributing model is experimental
    note: str = ""  # NOT_FOR_DIAGNOSTIC_USE where it applies
    # Patient fields: carried for HL7/FHIR (which need a patient) and for webhooks only when configured.
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    patient_name: str = ""  # DICOM PN, e.g. "Doe^Jane"
    patient_birth_date: str = ""  # DICOM DA
    patient_sex: str = ""  # M | F | O | ""
    study_date: str = ""
    study_time: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TriageAlert:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["models"] = [AlertModel(**m) for m in values.get("models") or []]
        prior = values.get("prior")
        values["prior"] = Prior(**prior) if prior else None
        return cls(**values)


class AlertError(Exception):
    """A delivery that did not succeed; ``retryable`` False sends the alert to the dead letter at once."""

    def __init__(self, reason: str, *, retryable: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
