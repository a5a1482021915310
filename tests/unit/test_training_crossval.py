"""`python -m training crossval`: every severity image is predicted once, by the one fold model that
never trained on it nor chose its epoch or zone threshold with it; bad fold arguments get a clear error.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.unit.test_training_weak import write_severity_folder
from training.cli import main
from training.crossval import plan


def test_plan_tests_each_fold_once_and_never_trains_on_it() -> None:
    plans = plan(5)
    assert [p.test for p in plans] == [0, 1, 2, 3, 4]
    assert sorted(p.validation for p in plans) == [0, 1, 2, 3, 4]
    for p in plans:
        assert p.test != p.validation and not {p.test, p.validation} & set(p.train)
        assert sorted((p.test, p.validation, *p.train)) == [0, 1, 2, 3, 4]
    # Test fold 4 is the shipped opacity model's protocol: folds 0-2 train, fold 3 selects.
    assert (plans[4].validation, plans[4].train) == (3, (0, 1, 2))
    with pytest.raises(ValueError, match="at least 3 folds"):
        plan(2)


def _opacity_folder(root: Path, n: int = 4) -> Path:
    """A few images with opacity masks (the pixel-supervised part of each fold's training)."""
    (root / "images").mkdir(parents=True)
    (root / "masks" / "opacity").mkdir(parents=True)
    rng = np.random.default_rng(2)
    with open(root / "index.csv", "w") as f:
        f.write("id,patient_id\n")
        for i in range(n):
            mask = np.zeros((64, 64), bool)
            mask[30:50, 8:24] = True
            image = np.where(mask, 150, 70) + rng.normal(0, 8, mask.shape)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"o{i}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / "opacity" / f"o{i}.png")
            f.write(f"o{i},q{i}\n")
    return root


@pytest.mark.timeout(600)
def test_crossval_predicts_every_image_once_with_a_model_that_never_saw_it(tmp_path: Path) -> None:
    rows = [{"image_id": f"s{i}", "patient_id": f"p{i}", "fold": str(i % 3), "score_r": str(i % 4)} for i in range(9)]
    severity = write_severity_folder(tmp_path / "severity", rows)
    run = tmp_path / "cv"
    rc = main(
        [
            "crossval",
            "opacity",
            "--folds",
            "3",
            "--data",
            str(severity),
            "--run",
            str(run),
            "--",
            "--data",
            str(_opacity_folder(tmp_path / "pixels")),
            "--negatives",
            "--input-size",
            "64",
            "--epochs",
            "1",
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--threads",
            "1",
            "--no-augment",
        ]
    )
    assert rc == 0
    summary = json.loads((run / "summary.json").read_text())
    predictions = json.loads((run / "cv_predictions.json").read_text())
    assert sorted(p["image_id"] for p in predictions) == [f"s{i}" for i in range(9)]
    assert summary["cv"]["n"] == 9 and len(summary["cv"]["confusion_matrix"]) == 7
    assert summary["command"].startswith("python -m training crossval opacity")
    for p in plan(3):
        fold = summary["per_fold"][p.name]
        assert (fold["test_fold"], fold["validation_fold"], fold["train_folds"]) == (
            p.test,
            p.validation,
            list(p.train),
        )
        split = json.loads((run / p.name / "split.json").read_text())
        assert split["weak_folds"] == {"train": list(p.train), "validation": [p.validation]}
        seen = {i for side in ("train", "validation") for i in split[side].get("severity", [])}
        tested = {x["image_id"] for x in predictions if x["fold"] == p.test}
        assert tested == {f"s{i}" for i in range(9) if i % 3 == p.test} and not tested & seen
        assert {x["zone_threshold"] for x in predictions if x["fold"] == p.test} == {fold["zone_threshold"]}
    # A second call finds the fold runs and only evaluates them again: same predictions.
    mtime = (run / "fold0" / "best.pt").stat().st_mtime
    assert (
        main(["crossval", "opacity", "--folds", "3", "--data", str(severity), "--run", str(run), "--evaluate-only"])
        == 0
    )
    assert json.loads((run / "cv_predictions.json").read_text()) == predictions
    assert (run / "fold0" / "best.pt").stat().st_mtime == mtime


def test_one_fold_severity_evaluation_is_refused_clearly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert main(["evaluate", "severity", "--folds", "3"]) == 2
    assert "at least two folds" in caplog.text


def test_crossval_rejects_a_fold_that_does_not_exist(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert main(["crossval", "opacity", "--only", "7"]) == 2
    assert "no such test fold" in caplog.text


def test_crossval_keeps_the_protocol_options_to_itself(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert main(["crossval", "opacity", "--", "--weak-val-folds", "4", "--epochs", "1"]) == 2
    assert "--weak-val-folds" in caplog.text and "for each fold itself" in caplog.text
