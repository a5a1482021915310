"""The triage decision for one study: a level from the configured rules, and the values behind it.

Pure functions over plain data (no database, no DICOM), so every rule is unit-tested by hand and the
decision recorded in the audit log can be recomputed from its inputs. A study's level is the most
pressing level of the rules that hold on any of its analysed images (severity change is a study-level
value: the study's worst severity against the patient's last prior). A rule whose finding comes from a
model marked ``experimental`` raises nothing unless ``triage.allow_experimental`` is on; it is still
reported, so the audit log says what would have happened.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from node.alerts.message import TRIAGE_LEVELS, AlertModel, Prior, TriageLevel
from node.runtime.config import TriageConfig, TriageRule

#: Models each rule condition depends on (a finding is experimental when one of them is).
CONDITION_MODELS: dict[str, tuple[str, ...]] = {
    "pneumothorax_probability_gte": ("pneumothorax",),
    "severity_gte": ("lung", "opacity"),
    "severity_change_gte": ("lung", "opacity"),
}

NO_ANALYSABLE_IMAGE = "no analysable image"


@dataclass(frozen=True)
class ImageFindings:
    """What the worker found on one analysed (frontal) image of the study."""

    instance_id: int
    sop_instance_uid: str
    series_instance_uid: str = ""
    severity_score: int | None = None
    pneumothorax_present: bool | None = None
    pneumothorax_probability: float | None = None
    pneumothorax_side: str | None = None
    models: tuple[AlertModel, ...] = ()

    def experimental(self, names: tuple[str, ...]) -> bool:
        """True when a model among `names` that ran on this image is experimental."""
        return any(m.status == "experimental" for m in self.models if m.name in names)


@dataclass(frozen=True)
class RuleHit:
    rule: str
    level: TriageLevel
    reason: str
    instance_id: int | None
    raised: bool  # False: held back because a model behind it is experimental


@dataclass
class Decision:
    """A study's triage level and everything an alert or the worklist says about it."""

    level: TriageLevel
    reasons: list[str]
    hits: list[RuleHit] = field(default_factory=list)
    severity_score: int | None = None
    severity_source: ImageFindings | None = None
    severity_change: int | None = None
    prior: Prior | None = None
    pneumothorax: ImageFindings | None = None  # the image with the highest pneumothorax probability
    source: ImageFindings | None = None  # the image the level came from (else the worst one)
    images: int = 0
    experimental: bool = False

    @property
    def fired(self) -> list[str]:
        """Names of the rules that raised the level."""
        return [h.rule for h in self.hits if h.raised]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _sev_key(f: ImageFindings) -> tuple[int, float]:
    return (f.severity_score if f.severity_score is not None else -1, f.pneumothorax_probability or 0.0)


def _check(rule: TriageRule, f: ImageFindings | None, change: int | None) -> str | None:
    """Why `rule` holds (one clause per condition), or None when it does not."""
    w = rule.when
    clauses: list[str] = []
    if w.pneumothorax_probability_gte is not None:
        p = f.pneumothorax_probability if f else None
        # The worker's call (the card's calibrated presence_threshold) comes first: a probability
        # above the rule's value but below the card's is "absent" in the SR and must not alert.
        if p is None or not (f and f.pneumothorax_present) or p < w.pneumothorax_probability_gte:
            return None
        side = f" ({f.pneumothorax_side})" if f and f.pneumothorax_side else ""
        clauses.append(f"pneumothorax probability {p:.2f} >= {w.pneumothorax_probability_gte:.2f}{side}")
    if w.severity_gte is not None:
        s = f.severity_score if f else None
        if s is None or s < w.severity_gte:
            return None
        clauses.append(f"severity {s}/6 >= {w.severity_gte}")
    if w.severity_change_gte is not None:
        if change is None or change < w.severity_change_gte:
            return None
        clauses.append(f"severity change {change:+d} >= {w.severity_change_gte:+d} against the prior")
    return " and ".join(clauses)


def _models_behind(rule: TriageRule) -> tuple[str, ...]:
    set_fields = [k for k, v in rule.when.model_dump().items() if v is not None]
    return tuple(dict.fromkeys(m for k in set_fields for m in CONDITION_MODELS[k]))


def decide(images: list[ImageFindings], cfg: TriageConfig, prior: Prior | None = None) -> Decision:
    """The level of a study whose analysed images are `images` (empty: none could be analysed)."""
    if not images:
        return Decision(level="routine", reasons=[NO_ANALYSABLE_IMAGE])
    worst = max(images, key=_sev_key)
    severity = worst.severity_score
    change = (
        severity - prior.severity_score
        if severity is not None and prior is not None and prior.severity_score is not None
        else None
    )
    ptx = max(images, key=lambda f: f.pneumothorax_probability if f.pneumothorax_probability is not None else -1.0)
    decision = Decision(
        level="routine",
        reasons=[],
        severity_score=severity,
        severity_source=worst,
        severity_change=change,
        prior=prior,
        pneumothorax=ptx if ptx.pneumothorax_probability is not None else None,
        images=len(images),
        experimental=any(m.status == "experimental" for f in images for m in f.models),
    )
    rank = {level: i for i, level in enumerate(TRIAGE_LEVELS)}
    for rule in cfg.rules:
        # A rule holds on the image where it holds best: try each, keep the first that matches,
        # the worst image first (the study-level change is the same for all).
        for f in (
            sorted(images, key=lambda f: (f.pneumothorax_probability or 0.0, *_sev_key(f)), reverse=True)
            if rule.when.pneumothorax_probability_gte is not None
            else sorted(images, key=_sev_key, reverse=True)
        ):
            why = _check(rule, f, change)
            if why is None:
                continue
            experimental = f.experimental(_models_behind(rule))
            raised = cfg.allow_experimental or not experimental
            decision.hits.append(RuleHit(rule.name, rule.level, why, f.instance_id, raised))
            if raised and rank[rule.level] < rank[decision.level]:
                decision.level, decision.source = rule.level, f
            break
    for hit in decision.hits:
        if hit.raised:
            note = " (experimental model)" if decision.experimental else ""
            decision.reasons.append(f"{hit.level} by rule {hit.rule!r}: {hit.reason}{note}")
        else:
            decision.reasons.append(
                f"rule {hit.rule!r} would make it {hit.level} ({hit.reason}), but a model "
                "behind it is experimental and triage.allow_experimental is false"
            )
    if not decision.hits:
        values = [f"severity {severity}/6" if severity is not None else "severity not measured"]
        if decision.pneumothorax is not None:
            values.append(f"pneumothorax probability {decision.pneumothorax.pneumothorax_probability:.2f}")
        if change is not None:
            values.append(f"change {change:+d} against the prior")
        decision.reasons.append("routine: no triage rule holds (" + ", ".join(values) + ")")
    if decision.source is None:
        decision.source = worst
    return decision
