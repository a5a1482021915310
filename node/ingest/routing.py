"""Routing: decide from the header whether an instance is analysed, and with which models and destinations.

Rules come from the configuration and are tried in order; the first match wins. A rule matches when
every non-empty criterion lists the instance's value (case-insensitive; ``""`` in a list matches an
absent attribute). Anything no rule matches is skipped, with the reason an administrator needs
("not chest: BodyPartExamined HAND", "lateral view LL", "modality CT not routed", "patient age 6
years, below the rule's minimum 18").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydicom.uid import UID

from node.ingest.header import Header
from node.runtime.config import ModelsConfig, Rule, RuleMatch

log = logging.getLogger(__name__)

LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"})


@dataclass(frozen=True)
class RouteDecision:
    action: Literal["analyze", "skip"]
    rule: str = ""
    reason: str = ""
    models: list[str] = field(default_factory=list)
    destinations: list[str] = field(default_factory=list)


def _matches(allowed: Sequence[str], value: str) -> bool:
    return not allowed or value.upper() in {a.strip().upper() for a in allowed}


def _sop_class_matches(allowed: Sequence[str], uid: str) -> bool:
    # Accept UIDs or pydicom keywords ("CTImageStorage") in the rule.
    return not allowed or uid in allowed or UID(uid).keyword in allowed


def _mismatch(rule: Rule, h: Header, calling_ae: str) -> str | None:
    """Why the rule does not match (the first failing criterion), or None when it matches."""
    m = rule.match
    if not _matches(m.calling_ae, calling_ae):
        return f"calling AE {calling_ae} not routed"
    if not _matches(m.modality, h.modality):
        return f"modality {h.modality or '(none)'} not routed"
    if not _sop_class_matches(m.sop_class, h.sop_class_uid):
        return f"SOP Class {UID(h.sop_class_uid).name} not routed"
    if not _matches(m.body_part, h.body_part):
        if "CHEST" in {b.upper() for b in m.body_part}:
            return f"not chest: BodyPartExamined {h.body_part or '(none)'}"
        return f"BodyPartExamined {h.body_part or '(none)'} not routed"
    if not _matches(m.view_position, h.view_position):
        if h.view_position in LATERAL_VIEWS:
            return f"lateral view {h.view_position}"
        return f"ViewPosition {h.view_position or '(none)'} not routed"
    return _age_mismatch(m, h.patient_age_years)


def _years(value: float) -> str:
    # Truncated, as ages are told: 17.96 is "17.9", never "18" below a minimum of 18.
    return f"{math.floor(value * 10) / 10:.1f}".removesuffix(".0")


def _age_mismatch(m: RuleMatch, age: float | None) -> str | None:
    """Why the patient's age is outside the rule's bounds; an unknown age is never a reason."""
    if age is None:
        return None
    if m.min_patient_age_years is not None and age < m.min_patient_age_years:
        return f"patient age {_years(age)} years, below the rule's minimum {_years(m.min_patient_age_years)}"
    if m.max_patient_age_years is not None and age > m.max_patient_age_years:
        return f"patient age {_years(age)} years, above the rule's maximum {_years(m.max_patient_age_years)}"
    return None


def _criteria_met(rule: Rule, h: Header, calling_ae: str) -> int:
    m = rule.match
    return sum(
        [
            _matches(m.calling_ae, calling_ae),
            _matches(m.modality, h.modality),
            _sop_class_matches(m.sop_class, h.sop_class_uid),
            _matches(m.body_part, h.body_part),
            _matches(m.view_position, h.view_position),
            _age_mismatch(m, h.patient_age_years) is None,
        ]
    )


def not_analysable(h: Header) -> str | None:
    """Reasons no rule can override: the chest models read exactly one 2-D frame."""
    if h.frames > 1:
        return f"multi-frame {h.modality or 'image'} not analysed ({h.frames} frames)"
    if not h.has_pixel_data:
        return "no pixel data"
    return None


def decide(h: Header, calling_ae: str, rules: Sequence[Rule], models: ModelsConfig | None = None) -> RouteDecision:
    """Route one instance: the first matching rule, or skip with the closest rule's failing criterion."""
    if reason := not_analysable(h):
        return RouteDecision("skip", reason=reason)
    for rule in rules:
        if _mismatch(rule, h, calling_ae) is not None:
            continue
        if rule.action == "ignore":
            return RouteDecision("skip", rule=rule.name, reason=rule.reason or f"ignored by rule {rule.name}")
        enabled = [str(m) for m in rule.models if models is None or getattr(models, m)]
        if not enabled:
            return RouteDecision("skip", rule=rule.name, reason=f"rule {rule.name}: every model is switched off")
        return RouteDecision("analyze", rule=rule.name, models=enabled, destinations=list(rule.destinations))
    analyze_rules = [r for r in rules if r.action == "analyze"]
    if not analyze_rules:
        return RouteDecision("skip", reason="no analyze rule configured")
    closest = max(analyze_rules, key=lambda r: _criteria_met(r, h, calling_ae))  # max keeps the first on ties
    return RouteDecision("skip", reason=_mismatch(closest, h, calling_ae) or "no rule matched")
