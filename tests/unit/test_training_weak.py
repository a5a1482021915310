"""The weak zone loss of the opacity model: labels read per fold, zones that move with the image,
a loss that is low exactly when the worker's zone rule would agree with the labels, and a tiny run
on a severity-format folder whose weak loss goes down.
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

from training.augment import radiograph_augment
from training.data import Cached, SegmentationDataset, resize_mask
from training.train import TrainConfig, train
from training.weak import ZONE_THRESHOLD, hard_fractions, severity_samples, soft_zone_fractions, zone_loss
from workers import models, severity

SIZE = 64
FIELDS = ["image_id", "patient_id", "fold", "score_r", "score_d", *(f"brixia_{z}" for z in "ABCDEF")]


def _lungs(size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[8:56, 6:28] = True  # patient's right lung (image left)
    mask[8:56, 36:58] = True
    return mask


def _zones(size: int = SIZE) -> torch.Tensor:
    right, left = severity.split_lungs(_lungs(size))
    return torch.from_numpy(np.stack([z for side in (right, left) for z in severity.zone_masks(side)])).float()


def write_true_zones(run_dir: Path, image_ids: list[str], size: int = SIZE) -> None:
    """The zone cache of `write_severity_folder` images from their drawn lungs, so that a run never asks
    the shipped lung model (whose weights change with each release) where the zones are."""
    right, left = severity.split_lungs(_lungs(80))
    zones = np.stack([resize_mask(z, size) for side in (right, left) for z in severity.zone_masks(side)])
    run_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(run_dir / "zones.npz", **{i: zones.astype(np.uint8) for i in image_ids})


def _logits_filling(zones: torch.Tensor, affected: list[bool]) -> torch.Tensor:
    """Logits that are confidently opaque inside the affected zones and clear elsewhere."""
    opaque = (zones * torch.tensor(affected, dtype=torch.float32)[:, None, None]).sum(0) > 0
    return torch.where(opaque, 8.0, -8.0)[None, None]


def write_severity_folder(root: Path, rows: list[dict[str, str]]) -> Path:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for row in rows:
        image = np.where(_lungs(80), 60, 190) + rng.normal(0, 10, (80, 80))
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"{row['image_id']}.png")
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows([{k: row.get(k, "") for k in FIELDS} for row in rows])
    return root


def test_samples_follow_the_folds_and_read_both_label_kinds(tmp_path) -> None:
    folder = write_severity_folder(
        tmp_path / "severity",
        [
            {"image_id": "a", "patient_id": "p1", "fold": "0", "score_r": "2", "score_d": "3"},
            {
                "image_id": "b",
                "patient_id": "p2",
                "fold": "1",
                "brixia_A": "0",
                "brixia_B": "1",
                "brixia_C": "3",
                "brixia_D": "0",
                "brixia_E": "0",
                "brixia_F": "2",
            },
            {"image_id": "c", "patient_id": "p3", "fold": "4", "score_r": "5"},
            {"image_id": "d", "patient_id": "p4", "fold": "0"},  # no label at all: skipped
        ],
    )
    train_s = severity_samples(folder, (0, 1))
    assert [s.id for s in train_s] == ["a", "b"]
    a, b = train_s
    assert a.score == 2.5 and all(math.isnan(z) for z in a.zone_target) and not a.pixel_labels
    assert b.score is None and b.zone_target == (0.0, 0.5, 1.0, 0.0, 0.0, 1.0)  # Brixia 1 = half a zone
    assert [s.id for s in severity_samples(folder, (4,))] == ["c"]


def test_zone_fractions_and_counts_on_known_masks() -> None:
    zones = _zones()[None]
    logits = _logits_filling(zones[0], [True, False, True, False, False, True])
    fractions = soft_zone_fractions(torch.sigmoid(logits), zones)
    np.testing.assert_allclose(fractions[0].numpy(), [1, 0, 1, 0, 0, 1], atol=1e-3)
    assert (hard_fractions(torch.sigmoid(logits), zones) > 0.5).sum(1).tolist() == [3]


def test_loss_is_low_when_the_zone_rule_agrees_with_the_labels() -> None:
    zones = _zones()[None]
    truth = [True, True, False, False, False, True]
    target = torch.tensor([[float(t) for t in truth]])
    no_score = torch.tensor([math.nan])
    right = zone_loss(_logits_filling(zones[0], truth), zones, target, no_score)
    wrong = zone_loss(_logits_filling(zones[0], [not t for t in truth]), zones, target, no_score)
    assert right.item() < 0.01 < 1.0 < wrong.item()
    # A 0-6 score alone: three filled zones match a score of 3, not a score of 6.
    nan6 = torch.full((1, 6), math.nan)
    three = _logits_filling(zones[0], truth)
    assert zone_loss(three, zones, nan6, torch.tensor([3.0])).item() < 0.01
    assert zone_loss(three, zones, nan6, torch.tensor([6.0])).item() > 0.2


def test_unlabelled_samples_add_nothing_and_gradients_flow() -> None:
    zones = _zones()[None].repeat(2, 1, 1, 1)
    logits = torch.zeros(2, 1, SIZE, SIZE, requires_grad=True)
    target = torch.tensor([[1.0] * 6, [math.nan] * 6])
    loss = zone_loss(logits, zones, target, torch.tensor([math.nan, math.nan]))
    loss.backward()
    assert logits.grad is not None
    assert logits.grad[0].abs().sum() > 0 and logits.grad[1].abs().sum() == 0
    none = zone_loss(logits, zones, torch.full((2, 6), math.nan), torch.tensor([math.nan, math.nan]))
    assert none.item() == 0.0


def test_zones_move_with_the_augmented_image() -> None:
    zones = _zones().numpy().astype(np.uint8)
    image = np.where(zones.any(0), 200, 20).astype(np.uint8)  # the zones are the bright pixels
    cached = Cached(image, np.zeros((1, SIZE, SIZE), np.uint8), np.zeros((SIZE, SIZE), np.uint8), 0.0, zones=zones)
    torch.manual_seed(0)
    np.random.seed(0)
    # Albumentations draws from its own generator (seeding numpy does not fix it): seeded, the 8 draws are
    # the same on every run.
    ds = SegmentationDataset([cached], radiograph_augment(strength=1.0, seed=0))
    moved = 0
    for _ in range(8):
        item = ds[0]
        bright = item["x"][0] > ((100 / 255) - 0.5) / 0.25
        zone_union = item["zones"].any(0)
        # Exposure changes never push 200 below 100 or 20 above it: the bright region is the zones.
        assert (bright == zone_union).mean() > 0.97
        moved += int(not np.array_equal(zone_union, zones.any(0)))
    assert moved  # the geometric part of the augmentation did move them


@pytest.mark.timeout(300)
def test_tiny_weak_run_lowers_the_weak_loss(tmp_path) -> None:
    """Pixel masks from nothing: the opacity model learns the zone labels alone."""
    rows = []
    for i in range(8):
        rows.append(
            {
                "image_id": f"s{i}",
                "patient_id": f"p{i}",
                "fold": str(i % 2),
                "score_r": "2",
                **{f"brixia_{z}": "2" if z in "CF" else "0" for z in "ABCDEF"},
            }
        )
    folder = write_severity_folder(tmp_path / "severity", rows)
    spec = dataclasses.replace(models.SPECS["opacity"], input_size=SIZE)
    cfg = TrainConfig(
        spec=spec,
        structures=("opacity",),
        data=[],
        run_dir=tmp_path / "run",
        epochs=8,
        batch_size=4,
        lr=3e-3,
        warmup_steps=1,
        patience=100,
        augment=False,
        threads=1,
        weak_data=[folder],
        weak_train_folds=(0, 1),
        weak_val_folds=(0,),
    )
    write_true_zones(cfg.run_dir, [r["image_id"] for r in rows])
    train(cfg)
    history = json.loads((cfg.run_dir / "history.json").read_text())
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    split = json.loads((cfg.run_dir / "split.json").read_text())
    assert split["weak_folds"] == {"train": [0, 1], "validation": [0]}
    assert (cfg.run_dir / "zones.npz").exists()
    # Validation reports zone accuracy and the severity MAE, also at the best zone threshold.
    last = history[-1]
    assert last["val_zone_acc"] > history[0]["val_zone_acc"] or last["val_zone_acc"] == 1.0
    assert last["val_severity_mae_tuned"] <= last["val_severity_mae"]
    # No pixel masks here: the Dice is undefined and counts as 0 in the selection figure.
    assert math.isnan(last["val_dice"])
    assert last["val_select"] == pytest.approx(-last["val_severity_mae_tuned"] / 6, abs=1e-4)
    assert (cfg.run_dir / "best.pt").exists() and ZONE_THRESHOLD == 0.5


def test_normals_check_counts_false_alarms_on_unseen_images_only(tmp_path) -> None:
    from training.severity_eval import load_models, normals_check

    folder = write_severity_folder(
        tmp_path / "normals", [{"image_id": f"n{i}", "patient_id": f"q{i}", "fold": "0"} for i in range(3)]
    )
    split_file = tmp_path / "split.json"
    # n2 is on neither side (a negative the run never drew): unseen, so it counts.
    split_file.write_text(json.dumps({"train": {"normals": ["n0"]}, "validation": {"normals": ["n1"]}}))
    models = load_models()  # the shipped lung and opacity models
    every = normals_check([folder], None, 0.5, *models)
    held = normals_check([folder], split_file, 0.5, *models)
    assert every["n"] == 3 and held["n"] == 2
    assert sum(held["score_counts"]) == 2 and len(held["score_counts"]) == 7
    # A higher zone threshold never calls more zones.
    strict = normals_check([folder], split_file, 0.95, *models)
    assert strict["mean_score"] <= held["mean_score"] and strict["zone_threshold"] == 0.95
