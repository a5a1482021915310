"""Pneumothorax presence calibration (training.calibrate): the threshold for a target false-alarm
rate on hand-computed cases, the per-source counting, the roles that keep calibration and test
images apart, and the command end to end on tiny synthetic folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.support.synthetic_lungs import lung_folder
from training.calibrate import (
    assign_role,
    auc,
    auc_by_source,
    calibrate,
    count_by_source,
    group,
    threshold_for_false_alarm_rate,
)
from training.cli import main
from training.data import Sample


def _neg(group_: str, p: float, role: str = "calibration") -> dict:
    return {"group": group_, "role": role, "truth_present": 0, "presence_prob": p}


def _pos(group_: str, p: float, dice_raw: float) -> dict:
    return {"group": group_, "role": "test", "truth_present": 1, "presence_prob": p, "dice_raw": dice_raw}


def test_threshold_allows_the_target_share_of_negatives_above_it() -> None:
    probs = [i / 100 for i in range(100)]  # 0.00 .. 0.99
    t = threshold_for_false_alarm_rate(probs, 0.02)
    assert t == 0.97  # 0.98 and 0.99 above it: 2 of 100
    assert sum(p > t for p in probs) == 2
    assert threshold_for_false_alarm_rate(probs, 0.0) == 0.99  # none above
    assert threshold_for_false_alarm_rate(probs[:49], 0.02) == 0.48  # floor(0.98) = 0 allowed


def test_threshold_is_rounded_up_never_adding_a_false_alarm() -> None:
    probs = [0.123411, 0.5, 0.2, 0.1]
    t = threshold_for_false_alarm_rate(probs, 0.25)  # one allowed: the 0.5
    assert t == 0.2
    t = threshold_for_false_alarm_rate([0.123411, 0.9], 0.5)
    assert t == 0.1235 and sum(p > t for p in [0.123411, 0.9]) == 1


def test_threshold_refuses_no_negatives_or_a_rate_of_one() -> None:
    with pytest.raises(ValueError):
        threshold_for_false_alarm_rate([], 0.02)
    with pytest.raises(ValueError):
        threshold_for_false_alarm_rate([0.1], 1.0)


def test_calibration_keeps_every_source_at_the_target() -> None:
    # Source a: 50 negatives 0.00..0.49 -> 1 allowed above -> 0.48; source b: 50 at 0.50..0.99 -> 0.98.
    rows = [_neg("a", i / 100) for i in range(50)] + [_neg("b", 0.5 + i / 100) for i in range(50)]
    rows += [_neg("c", 0.999, role="test"), _pos("ptx", 0.999, 1.0)]  # never read for the threshold
    cal = calibrate(rows, 0.02)
    assert cal["per_source"] == {"a": 0.48, "b": 0.98}
    assert cal["threshold"] == 0.98
    assert cal["pooled"] == 0.97  # 2 of the 100 pooled above: all from b
    assert cal["n_by_source"] == {"a": 50, "b": 50}


def test_counting_by_source_separates_report_only_groups() -> None:
    rows = [
        _pos("ptx", 0.9, 0.8),
        _pos("ptx", 0.7, 0.6),
        _pos("ptx", 0.2, 0.9),
        _neg("normal", 0.1, "test"),
        _neg("normal", 0.6, "test"),
        _neg("normal", 0.3, "test"),
        _neg("pneumonia", 0.95, "test"),
        _neg("pneumonia", 0.99, "test"),
    ]
    out = count_by_source(rows, 0.5, report_only=["pneumonia"])
    ptx = out["by_source"]["ptx"]
    assert (ptx["positives"], ptx["found"], ptx["sensitivity"]) == (3, 2, 0.6667)
    assert ptx["dice_positives"] == round((0.8 + 0.6 + 0.0) / 3, 4)  # the missed one delivers no mask
    assert out["by_source"]["normal"] == {"n": 3, "negatives": 3, "false_alarms": 1, "false_alarm_rate": 0.3333}
    assert out["by_source"]["pneumonia"]["false_alarms"] == 2
    assert out["overall"]["negatives"] == 3 and out["overall"]["false_alarms"] == 1  # pneumonia left out
    assert out["report_only"] == ["pneumonia"]


def test_auc_counts_pairs_ranked_right_and_ties_half() -> None:
    # Pairs: 0.9 beats 0.1, 0.5, 0.5 (3); 0.5 beats 0.1 and ties 0.5 twice (1 + 1): 5 of 6.
    assert auc([0.9, 0.5], [0.1, 0.5, 0.5]) == pytest.approx(5 / 6)
    assert auc([0.2], [0.3]) == 0.0 and auc([0.3], [0.2]) == 1.0
    rows = [
        _pos("ptx", 0.9, 1.0),
        _pos("ptx", 0.5, 1.0),
        _neg("a", 0.1, "test"),
        _neg("a", 0.5, "test"),
        _neg("b", 0.95, "test"),
    ]
    out = auc_by_source(rows, report_only=["b"])
    assert out == {"overall": 0.875, "a": 0.875, "b": 0.0}  # a: (2 + 1.5) of 4 pairs


def _sample(source: str, sid: str, patient: str = "", **row: str) -> Sample:
    return Sample(source, sid, Path(f"{sid}.png"), {"pneumothorax": None}, patient or f"{source}:{sid}", row=row)


def test_roles_leave_out_training_images_and_follow_folders_and_patients() -> None:
    trained = {"jsrt/a"}
    assert assign_role(_sample("jsrt", "a"), False, trained) is None
    assert assign_role(_sample("pneumothorax", "p"), True, trained) == "test"
    cqu = "covid_opacity_negatives"
    assert (
        assign_role(_sample(cqu, "n1", **{"class": "Normal", "source_split": "Train"}), False, trained) == "calibration"
    )
    assert assign_role(_sample(cqu, "n2", **{"class": "Normal", "source_split": "Val"}), False, trained) == "test"
    pneumonia = _sample(cqu, "x", **{"class": "Non-COVID", "source_split": "Train"})
    assert group(pneumonia) == f"{cqu}:Non-COVID"
    assert assign_role(pneumonia, False, trained) == "test"  # report only
    # Folders without source_split: by patient, so two images of one patient share a role.
    roles = {assign_role(_sample("darwin", f"i{i}", patient=f"p{i // 2}"), False, set()) for i in range(40)}
    assert roles == {"calibration", "test"}
    for i in range(0, 40, 2):
        assert assign_role(_sample("darwin", f"i{i}", patient=f"p{i // 2}"), False, set()) == assign_role(
            _sample("darwin", f"i{i + 1}", patient=f"p{i // 2}"), False, set()
        )


def test_calibrate_command_end_to_end(tmp_path) -> None:
    from tests.support.tiny_models import write_tiny_weights

    positives = lung_folder(tmp_path / "ptx", n=4)
    (positives / "masks" / "lungs").rename(positives / "masks" / "pneumothorax")
    negatives = lung_folder(tmp_path / "normals", n=16)
    weights = write_tiny_weights(tmp_path / "w", names=("pneumothorax",))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": {"ptx": ["img0"], "normals": ["img0", "img1"]}, "validation": {}}))
    out = tmp_path / "cal"
    rc = main(
        [
            "calibrate",
            "pneumothorax",
            "--data",
            str(positives),
            "--negatives",
            str(negatives),
            "--trained-on",
            str(split),
            "--weights-dir",
            str(weights),
            "--false-alarm-rate",
            "0.25",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    ids = {(r["group"], r["id"]) for r in rows}
    assert ("ptx", "img0") not in ids and ("normals", "img1") not in ids and len(rows) == 3 + 14
    cal = [float(r["presence_prob"]) for r in rows if r["role"] == "calibration"]
    t = summary["calibration"]["threshold"]
    assert cal and sum(p > t for p in cal) <= len(cal) // 4
    test = summary["test"]["by_source"]
    assert test["ptx"]["positives"] == 3
    assert test["normals"]["negatives"] == sum(r["role"] == "test" for r in rows if r["group"] == "normals")
    assert summary["command"].startswith("python -m training calibrate pneumothorax")
