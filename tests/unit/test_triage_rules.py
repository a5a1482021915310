"""node.triage.rules: levels from the configured rules, experimental gating, priors, reasons."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.alerts.message import AlertModel, Prior
from node.runtime.config import ConfigError, TriageConfig, load_settings
from node.triage.rules import NO_ANALYSABLE_IMAGE, ImageFindings, decide

VALIDATED = (
    AlertModel("lung", "3", "validated"),
    AlertModel("opacity", "3", "validated"),
    AlertModel("pneumothorax", "3", "validated"),
)
EXPERIMENTAL_PTX = (
    AlertModel("lung", "3", "validated"),
    AlertModel("opacity", "3", "validated"),
    AlertModel("pneumothorax", "2", "experimental"),
)


def image(
    i: int,
    severity: int | None = 0,
    ptx: float | None = 0.1,
    models: tuple[AlertModel, ...] = VALIDATED,
    side: str | None = None,
) -> ImageFindings:
    return ImageFindings(
        instance_id=i,
        sop_instance_uid=f"1.2.{i}",
        severity_score=severity,
        pneumothorax_present=None if ptx is None else ptx >= 0.5,
        pneumothorax_probability=ptx,
        pneumothorax_side=side,
        models=models,
    )


def test_no_image_is_routine_with_the_reason() -> None:
    d = decide([], TriageConfig())
    assert d.level == "routine" and d.reasons == [NO_ANALYSABLE_IMAGE] and d.images == 0


def test_pneumothorax_is_critical_and_names_the_image() -> None:
    d = decide([image(1, severity=5), image(2, severity=1, ptx=0.93, side="right")], TriageConfig())
    assert d.level == "critical"
    assert d.source is not None and d.source.instance_id == 2
    assert d.severity_score == 5 and d.severity_source is not None and d.severity_source.instance_id == 1
    assert d.fired == ["pneumothorax", "severe-opacity"]
    assert "pneumothorax probability 0.93 >= 0.50 (right)" in d.reasons[0]


def test_pneumothorax_below_the_cards_presence_threshold_raises_nothing() -> None:
    """A card's presence threshold (a calibrated one, say) can be above the rule's
    probability: the SR then says absent, and triage must agree."""
    absent = ImageFindings(
        instance_id=1,
        sop_instance_uid="1.2.1",
        severity_score=0,
        pneumothorax_present=False,
        pneumothorax_probability=0.7,
        pneumothorax_side=None,
        models=VALIDATED,
    )
    d = decide([absent], TriageConfig())
    assert d.level == "routine" and d.fired == []
    present = ImageFindings(
        instance_id=1,
        sop_instance_uid="1.2.1",
        severity_score=0,
        pneumothorax_present=True,
        pneumothorax_probability=0.9,
        pneumothorax_side="left",
        models=VALIDATED,
    )
    assert decide([present], TriageConfig()).level == "critical"


def test_severity_threshold_is_inclusive() -> None:
    assert decide([image(1, severity=4)], TriageConfig()).level == "urgent"
    d = decide([image(1, severity=3)], TriageConfig())
    assert d.level == "routine" and d.reasons[0].startswith("routine: no triage rule holds (severity 3/6")


def test_change_against_the_prior() -> None:
    prior = Prior("1.9", "20260101", 1)
    d = decide([image(1, severity=3)], TriageConfig(), prior)
    assert d.severity_change == 2 and d.level == "urgent" and d.fired == ["worsening"]
    assert "severity change +2 >= +2 against the prior" in d.reasons[0]
    assert decide([image(1, severity=2)], TriageConfig(), prior).level == "routine"
    assert decide([image(1, severity=None)], TriageConfig(), prior).severity_change is None


def test_experimental_model_raises_nothing_unless_allowed() -> None:
    images = [image(1, ptx=0.97, models=EXPERIMENTAL_PTX)]
    held = decide(images, TriageConfig())
    assert held.level == "routine" and held.fired == [] and held.experimental
    assert "experimental" in held.reasons[0] and "would make it critical" in held.reasons[0]
    allowed = decide(images, TriageConfig(allow_experimental=True))
    assert allowed.level == "critical" and "(experimental model)" in allowed.reasons[0]
    # Severity rules depend on lung + opacity only: a validated severity still raises the level.
    assert decide([image(1, severity=6, models=EXPERIMENTAL_PTX)], TriageConfig()).level == "urgent"


def test_all_conditions_of_a_rule_must_hold() -> None:
    cfg = TriageConfig(
        rules=[{"name": "both", "level": "critical", "when": {"severity_gte": 3, "pneumothorax_probability_gte": 0.5}}]
    )
    assert decide([image(1, severity=3, ptx=0.4)], cfg).level == "routine"
    assert decide([image(1, severity=3, ptx=0.6)], cfg).level == "critical"


def test_bad_rules_stop_start_up_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"triage.rules.0.level"):
        load_settings(triage={"rules": [{"name": "x", "level": "panic", "when": {"severity_gte": 1}}]})
    with pytest.raises(ConfigError, match="unknown key"):
        load_settings(triage={"rules": [{"name": "x", "level": "urgent", "when": {"severity_above": 1}}]})
    with pytest.raises(ConfigError, match="at least one of"):
        load_settings(triage={"rules": [{"name": "x", "level": "urgent", "when": {}}]})
    with pytest.raises(ConfigError, match="unknown destination"):
        load_settings(triage={"routes": {"critical": ["nowhere"]}})
    with pytest.raises(ConfigError, match=r"triage.routes"):
        load_settings(triage={"routes": {"stat": []}})


def test_examples_switch_experimental_triage_as_documented() -> None:
    deploy = Path(__file__).resolve().parents[2] / "deploy" / "config"
    assert load_settings(deploy / "cxrnode.example.toml").triage.allow_experimental is True
    assert load_settings(deploy / "cxrnode.production.toml").triage.allow_experimental is False
