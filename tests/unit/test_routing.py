"""Routing and header checks on the headers of every file in shared/data/dicom (per manifest.csv)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from node.ingest.header import Header, Refusal, check_dataset, pixel_padding_excess, read_header
from node.ingest.routing import decide
from node.runtime.config import ModelsConfig, Rule, RuleMatch, default_rules
from tests.support.paths import dicom_dir, dicom_manifest

MANIFEST = dicom_manifest()
SKIP_REASONS = {
    "25": "not chest: BodyPartExamined HAND",
    "26": "modality CT not routed",
    "27": "lateral view LL",
    "37": "multi-frame CR not analysed (2 frames)",
}


def header(prefix: str) -> Header:
    name = next(r["file"] for r in MANIFEST if r["file"].startswith(prefix))
    return read_header(dicom_dir() / name)


def consistent_rows() -> list[dict[str, str]]:
    return [r for r in MANIFEST if r["expect"] == "accept"]


@pytest.mark.parametrize("row", consistent_rows(), ids=lambda r: r["file"][:2])
def test_default_rules_follow_the_manifest(row: dict[str, str]) -> None:
    h = read_header(dicom_dir() / row["file"])
    decision = decide(h, "PACS", default_rules(), ModelsConfig())
    if row["analysable"] == "yes":
        assert decision.action == "analyze", (row["file"], decision)
        assert decision.models == ["lung", "opacity", "pneumothorax"]
        assert decision.destinations == ["reply-to-sender"]
    else:
        assert decision.action == "skip"
        assert decision.reason == SKIP_REASONS[row["file"][:2]]


# 34 (unknown SOP class) never reaches the handler: no presentation context (see test_ingest);
# 35/36 cannot be sent at all.
REFUSED_IN_HANDLER = [r for r in MANIFEST if r["expect"] == "reject" and r["file"][:2] not in ("34", "35", "36")]


@pytest.mark.parametrize("row", REFUSED_IN_HANDLER, ids=lambda r: r["file"][:2])
def test_bad_files_are_refused_with_the_manifest_status(row: dict[str, str]) -> None:
    path = dicom_dir() / row["file"]
    with pytest.raises(Refusal) as refusal:
        h = read_header(path)
        meta_uid = h.sop_instance_uid or "from-file-meta"
        check_dataset(
            h, affected_sop_class=h.sop_class_uid, affected_sop_instance=meta_uid, file_size=path.stat().st_size
        )
    status = refusal.value.status
    expected = {"28": range(0xC000, 0xD000), "30": (0xC000, 0xA900)}.get(row["file"][:2], (0xA900,))
    assert status in expected, (row["file"], hex(status), refusal.value.reason)


def test_command_mismatch_is_refused() -> None:
    h = header("09")
    with pytest.raises(Refusal, match=r"SOP Class UID .* differs") as r:
        check_dataset(
            h, affected_sop_class="1.2.840.10008.5.1.4.1.1.7", affected_sop_instance=h.sop_instance_uid, file_size=10**9
        )
    assert r.value.status == 0xA900
    with pytest.raises(Refusal, match=r"SOP Instance UID .* differs"):
        check_dataset(h, affected_sop_class=h.sop_class_uid, affected_sop_instance="1.2.3", file_size=10**9)


def test_pixel_data_length_against_the_image_description() -> None:
    h = header("07")  # native, one frame of 16-bit pixels
    frame = (h.rows or 0) * (h.columns or 0) * 2
    assert h.pixel_data_length == frame and pixel_padding_excess(h) == 0

    def check(length: int) -> Header:
        padded = replace(h, pixel_data_length=length)
        check_dataset(
            padded, affected_sop_class=h.sop_class_uid, affected_sop_instance=h.sop_instance_uid, file_size=10**9
        )
        return padded

    assert pixel_padding_excess(check(frame + 1)) == 1  # trailing padding short of a frame: stored
    assert pixel_padding_excess(check(frame + frame - 2)) == frame - 2
    for length in (frame - 2, frame + frame):  # short; or a frame the header does not count
        with pytest.raises(Refusal, match=f"Pixel Data is {length} bytes") as r:
            check(length)
        assert r.value.status == 0xA900


def test_first_matching_rule_wins_and_ignore_rules_skip() -> None:
    rules = [
        Rule(
            name="quiet-modality",
            match=RuleMatch(calling_ae=["OLDCR"]),
            action="ignore",
            reason="OLDCR images are not analysed",
        ),
        Rule(
            name="ct-research",
            match=RuleMatch(sop_class=["CTImageStorage"]),
            models=["lung"],
            destinations=["RESEARCH"],
        ),
        *default_rules(),
    ]
    chest = header("01")
    assert decide(chest, "OLDCR", rules).reason == "OLDCR images are not analysed"
    assert decide(chest, "PACS", rules).rule == "chest-frontal"
    ct = decide(header("26"), "PACS", rules)
    assert (ct.action, ct.rule, ct.models, ct.destinations) == ("analyze", "ct-research", ["lung"], ["RESEARCH"])


def test_switched_off_models_are_not_requested() -> None:
    models = ModelsConfig(pneumothorax=False)
    assert decide(header("01"), "PACS", default_rules(), models).models == ["lung", "opacity"]
    off = ModelsConfig(lung=False, opacity=False, pneumothorax=False)
    decision = decide(header("01"), "PACS", default_rules(), off)
    assert decision.action == "skip" and "switched off" in decision.reason


def test_no_analyze_rule_skips_everything() -> None:
    decision = decide(header("01"), "PACS", [])
    assert decision.action == "skip" and decision.reason == "no analyze rule configured"


@pytest.mark.parametrize(
    ("age", "years", "action"),
    [
        (6.0, "6", "skip"),
        (17.96, "17.9", "skip"),  # truncated: never "18 years, below the rule's minimum 18"
        (18.0, "18", "analyze"),
        (70.0, "70", "analyze"),
        (None, "", "analyze"),
    ],
)
def test_default_rules_analyse_adults_and_patients_of_unknown_age(age: float | None, years: str, action: str) -> None:
    decision = decide(replace(header("01"), patient_age_years=age), "PACS", default_rules(), ModelsConfig())
    assert decision.action == action
    if action == "skip":
        # The closest rule is chest-frontal: every other criterion holds, so the age is the reason.
        assert decision.reason == f"patient age {years} years, below the rule's minimum 18"


def test_an_age_window_rule_routes_children_elsewhere() -> None:
    # An unknown age matches every bound, so the adults' rule comes first: it takes films without an
    # age, and the children's rule gets only those known to be younger.
    rules = [
        *default_rules(),
        Rule(name="paediatric", match=RuleMatch(max_patient_age_years=18), action="ignore", reason="paediatric film"),
    ]
    assert decide(replace(header("01"), patient_age_years=0.5), "PACS", rules).reason == "paediatric film"
    assert decide(replace(header("01"), patient_age_years=40.0), "PACS", rules).rule == "chest-frontal"
    assert decide(header("01"), "PACS", rules).rule == "chest-frontal"


def test_age_bounds_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="below min_patient_age_years"):
        RuleMatch(min_patient_age_years=18, max_patient_age_years=16)
    with pytest.raises(ValueError):
        RuleMatch(min_patient_age_years=-1)
