"""The RALO per-lung extent weak label (training.ralo): bins -> fraction intervals, a hinge loss with a
hand-computed value, the reader (folds, the 0-4 scale kept apart from the 0-6 score), the training
wiring and `evaluate extent`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.cli import main
from training.ralo import (
    EXTENT_BINS,
    extent_interval,
    extent_loss,
    fraction_to_extent,
    is_ralo_folder,
    lung_fractions,
    ralo_samples,
    summarise_extents,
)
from training.train import TrainConfig, collect_samples, train
from workers import models, severity

SIZE = 64
FIELDS = [
    "id",
    "patient_id",
    "fold",
    "r1_right_geographic",
    "r1_left_geographic",
    "r2_right_geographic",
    "r2_left_geographic",
    "image_path",
]


def _lungs(size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[8:56, 6:28] = True  # patient's right lung (image left)
    mask[8:56, 36:58] = True
    return mask


def _zones(size: int = SIZE) -> torch.Tensor:
    right, left = severity.split_lungs(_lungs(size))
    return torch.from_numpy(np.stack([z for side in (right, left) for z in severity.zone_masks(side)])).float()


def write_ralo_folder(root: Path, rows: list[dict[str, str]]) -> Path:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for row in rows:
        image = np.where(_lungs(80), 60, 190) + rng.normal(0, 10, (80, 80))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"{row['id']}.png")
    with open(root / "index.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(
            [{k: row.get(k, f"images/{row['id']}.png" if k == "image_path" else "") for k in FIELDS} for row in rows]
        )
    return root


def _row(i: int, fold: int, right: tuple[int, int], left: tuple[int, int]) -> dict[str, str]:
    return {
        "id": f"ralo_{i:04d}",
        "patient_id": f"ralo:S{i}",
        "fold": str(fold),
        "r1_right_geographic": str(right[0]),
        "r2_right_geographic": str(right[1]),
        "r1_left_geographic": str(left[0]),
        "r2_left_geographic": str(left[1]),
    }


def test_bins_become_fraction_intervals_that_agree_with_every_rater() -> None:
    assert EXTENT_BINS[2] == (0.25, 0.5)
    assert extent_interval([2, 2]) == (0.25, 0.5)
    assert extent_interval([1, 3]) == (0.0, 0.75)  # raters disagree: anything either would accept
    assert extent_interval([0, 0]) == (0.0, 0.0)
    assert extent_interval([4]) == (0.75, 1.0)
    assert all(math.isnan(v) for v in extent_interval([]))
    with pytest.raises(ValueError):
        extent_interval([5])
    # Measured fraction -> 0-4 extent with the same edges; a few stray pixels are "none".
    assert [fraction_to_extent(f) for f in (0.0, 0.005, 0.1, 0.25, 0.49, 0.5, 0.74, 0.75, 1.0)] == [
        0,
        0,
        1,
        2,
        2,
        3,
        3,
        4,
        4,
    ]


def test_extent_loss_hand_computed() -> None:
    """Right lung: a 10x10 block whose first 3 rows are opaque (f = 30/100 = 0.3); left lung: a 10x10
    block, all clear (f = 0).

    - right labelled 1 (< 25 %: interval [0, 0.25])  -> hinge 0.3 - 0.25 = 0.05
    - left labelled 2 (25-50 %: interval [0.25, 0.5]) -> hinge 0.25 - 0 = 0.25
    mean over the two lungs = 0.15; with the left unlabelled (NaN) the loss is the right's 0.05 alone,
    and a right lung labelled 2 (0.3 inside [0.25, 0.5]) costs nothing.
    """
    zones = torch.zeros(1, 6, 20, 20)
    zones[0, 0, 0:4, 0:10] = 1  # right upper/middle/lower zones tile the right block
    zones[0, 1, 4:7, 0:10] = 1
    zones[0, 2, 7:10, 0:10] = 1
    zones[0, 3:6, 10:20, 10:20] = 1  # the left block (overlapping zone maps count once)
    logits = torch.full((1, 1, 20, 20), -40.0)
    logits[0, 0, 0:3, 0:10] = 40.0  # 30 opaque pixels in the right lung, some outside both lungs too
    logits[0, 0, 15:20, 0:5] = 40.0  # outside both lungs: never counted
    np.testing.assert_allclose(lung_fractions(torch.sigmoid(logits), zones).numpy(), [[0.3, 0.0]], atol=1e-6)
    bounds = torch.tensor([[*EXTENT_BINS[1], *EXTENT_BINS[2]]])
    assert extent_loss(logits, zones, bounds).item() == pytest.approx(0.15, abs=1e-6)
    right_only = torch.tensor([[0.0, 0.25, math.nan, math.nan]])
    assert extent_loss(logits, zones, right_only).item() == pytest.approx(0.05, abs=1e-6)
    inside = torch.tensor([[0.25, 0.5, 0.0, 0.0]])  # right 2 (0.3 inside), left 0 (0 inside)
    assert extent_loss(logits, zones, inside).item() == pytest.approx(0.0, abs=1e-6)


def test_gradients_only_where_the_fraction_is_outside_its_interval() -> None:
    zones = _zones()[None].repeat(2, 1, 1, 1)
    logits = torch.zeros(2, 1, SIZE, SIZE, requires_grad=True)  # f = 0.5 in every lung
    bounds = torch.tensor(
        [
            [0.0, 0.25, 0.25, 0.5],  # right too high -> gradient; left inside -> none
            [math.nan] * 4,
        ]
    )  # unlabelled sample
    loss = extent_loss(logits, zones, bounds)
    assert loss.item() == pytest.approx(0.125, abs=1e-5)  # (0.25 + 0) / 2 labelled lungs
    loss.backward()
    assert logits.grad is not None
    right, left = severity.split_lungs(_lungs())
    g = logits.grad[0, 0].numpy()
    assert (g[right] > 0).all() and np.abs(g[left]).sum() == 0 and np.abs(g[~(right | left)]).sum() == 0
    assert logits.grad[1].abs().sum() == 0
    none = extent_loss(logits, zones, torch.full((2, 4), math.nan))
    assert none.item() == 0.0


def test_reader_follows_the_folds_and_keeps_the_scale_apart(tmp_path) -> None:
    folder = write_ralo_folder(
        tmp_path / "severity_ralo", [_row(0, 0, (2, 2), (1, 3)), _row(1, 1, (0, 0), (4, 4)), _row(2, 4, (3, 3), (3, 3))]
    )
    assert is_ralo_folder(folder)
    train_s = ralo_samples(folder, (0, 1))
    assert [s.id for s in train_s] == ["ralo_0000", "ralo_0001"]
    a, b = train_s
    assert a.extent_bounds == (0.25, 0.5, 0.0, 0.75) and a.extent_score == (2.0, 2.0)
    assert b.extent_bounds == (0.0, 0.0, 0.75, 1.0) and b.extent_score == (0.0, 4.0)
    # Not the 0-6 zone score nor Brixia: training.weak never sees a label on these samples.
    assert a.score is None and a.zone_target == () and not a.pixel_labels
    assert a.image.name == "ralo_0000.png" and a.patient == "ralo:S0"
    assert [s.id for s in ralo_samples(folder, (4,))] == ["ralo_0002"]


def test_summary_hand_computed() -> None:
    rows = [
        {
            "fold": 0,
            "right_extent": 2,
            "left_extent": 0,
            "right_reference": 2.5,
            "left_reference": 0.0,
            "raters": {"right": [2.0, 3.0], "left": [0.0, 0.0]},
        },
        {
            "fold": 1,
            "right_extent": 4,
            "left_extent": 1,
            "right_reference": 3.0,
            "left_reference": 2.0,
            "raters": {"right": [3.0, 3.0], "left": [2.0, 2.0]},
        },
    ]
    s = summarise_extents(rows)
    assert s["mae"] == {"right": 0.75, "left": 0.5, "both": 0.625}  # (0.5 + 1) / 2, (0 + 1) / 2
    assert s["per_fold"] == {"0": {"n_images": 1, "mae_both": 0.25}, "1": {"n_images": 1, "mae_both": 1.0}}
    assert s["rater_vs_mean_mae"] == 0.125  # only the right lung of row 0 disagrees: |2 - 2.5| / 4 lungs
    assert s["mean_signed_error"] == pytest.approx(-0.125)


def test_negatives_where_keeps_only_matching_rows(tmp_path) -> None:
    neg = tmp_path / "covid_opacity_negatives"
    (neg / "images").mkdir(parents=True)
    with open(neg / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "class"])
        w.writerows([["n1", "Normal"], ["n2", "Non-COVID"], ["n3", "Normal"]])
    cfg = TrainConfig(
        spec=models.SPECS["opacity"],
        structures=("opacity",),
        data=[],
        run_dir=tmp_path / "r",
        negatives=[neg],
        negatives_where={"class": "Normal"},
    )
    assert [s.id for s in collect_samples(cfg)] == ["n1", "n3"]
    assert len(collect_samples(dataclasses.replace(cfg, negatives_where={}))) == 3


@pytest.mark.timeout(300)
def test_tiny_run_with_ralo_weak_data_and_evaluate_extent(tmp_path) -> None:
    rows = [_row(i, i % 3, (2, 2), (0, 1)) for i in range(9)]
    folder = write_ralo_folder(tmp_path / "severity_ralo", rows)
    spec = dataclasses.replace(models.SPECS["opacity"], input_size=SIZE)
    cfg = TrainConfig(
        spec=spec,
        structures=("opacity",),
        data=[],
        run_dir=tmp_path / "run",
        epochs=4,
        batch_size=4,
        lr=3e-3,
        warmup_steps=1,
        patience=100,
        augment=False,
        threads=1,
        weak_data=[folder],
        weak_train_folds=(0, 1),
        weak_val_folds=(2,),
    )
    train(cfg)
    history = json.loads((cfg.run_dir / "history.json").read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    last = history[-1]
    assert "val_extent_mae" in last and "val_severity_mae" not in last  # its own scale, its own figure
    assert last["val_select"] == pytest.approx(-last["val_extent_mae"] / 4, abs=1e-4)
    split = json.loads((cfg.run_dir / "split.json").read_text())
    assert len(split["train"]["severity_ralo"]) == 6 and len(split["validation"]["severity_ralo"]) == 3
    # Held-out fold 2 through the worker's masks (shipped lung model, this run's opacity model).
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "extent",
                "--data",
                str(folder),
                "--folds",
                "2",
                "--opacity-checkpoint",
                str(cfg.run_dir / "best.pt"),
                "--threads",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 3 and summary["folds"] == [2]
    assert set(summary["mae"]) == {"right", "left", "both"} and summary["baseline_constant_mae"] is not None
    assert summary["command"].startswith("python -m training evaluate extent")
    assert (out / "extents.csv").read_text().count("\n") == 4
