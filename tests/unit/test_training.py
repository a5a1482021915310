"""The training pipeline end to end on a tiny synthetic folder in the shared format.

A few steps on 8 images at 64x64: the loss goes down, the split keeps patients apart, `evaluate`
writes the expected per-image CSV and JSON, and the exported fp16 weights load in the workers'
ModelRunner and give the same output as the model had in training.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.synthetic_lungs import ellipse, lung_folder
from training.data import SegmentationDataset, cache_samples, read_folder
from training.evaluate import evaluate_segmentation
from training.export import NotBetterError, export
from training.metrics import dice
from training.predict import load_model, predict
from training.severity_eval import cross_validate
from training.splits import read_split, split
from training.train import TrainConfig, train
from workers import models
from workers.runner import ModelRunner
from workers.severity import split_lungs

SIZE = 64


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("tiny")
    folder = lung_folder(root / "tiny_lungs")
    spec = dataclasses.replace(models.SPECS["lung"], input_size=SIZE)
    cfg = TrainConfig(
        spec=spec,
        structures=("lungs",),
        data=[folder],
        run_dir=root / "run",
        epochs=8,
        batch_size=8,
        lr=3e-3,
        warmup_steps=1,
        val_fraction=0.0,
        patience=100,
        augment=False,
        threads=1,
    )
    summary = train(cfg)
    return folder, root / "run", summary


def test_loss_goes_down(tiny_run) -> None:
    _, run, summary = tiny_run
    history = json.loads((run / "history.json").read_text())
    assert len(history) == summary["epochs"] == 8
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert (run / "metrics.csv").read_text().startswith("epoch,")
    assert (run / "best.pt").exists() and (run / "last.pt").exists()


def test_resume_continues_instead_of_restarting(tiny_run, tmp_path) -> None:
    folder, run, _ = tiny_run
    spec = dataclasses.replace(models.SPECS["lung"], input_size=SIZE)
    cfg = TrainConfig(
        spec=spec,
        structures=("lungs",),
        data=[folder],
        run_dir=run,
        epochs=9,
        batch_size=8,
        lr=3e-3,
        warmup_steps=1,
        val_fraction=0.0,
        patience=100,
        augment=False,
        threads=1,
    )
    train(cfg, resume=True)
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 10))


def test_augmenting_workers_run_epochs_of_several_passes(tiny_run, tmp_path) -> None:
    """The GPU set-up: augmentation in DataLoader worker processes, epochs longer than the data."""
    folder, _, _ = tiny_run
    spec = dataclasses.replace(models.SPECS["lung"], input_size=SIZE)
    cfg = TrainConfig(
        spec=spec,
        structures=("lungs",),
        data=[folder],
        run_dir=tmp_path / "run",
        epochs=2,
        batch_size=4,
        epoch_images=20,
        lr=3e-3,
        warmup_steps=1,
        val_fraction=0.0,
        patience=100,
        threads=1,
        workers=2,
    )
    train(cfg)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["state"]
    assert state["epoch"] == 2 and state["step"] == 2 * (20 // 4)  # 5 steps from 8 images: two passes


def test_augmenting_workers_draw_different_augmentations(tiny_run) -> None:
    from torch.utils.data import DataLoader

    from training.augment import radiograph_augment
    from training.train import _seed_augment_worker

    folder, _, _ = tiny_run
    cached = cache_samples(read_folder(folder, ("lungs",))[:1] * 4, ("lungs",), SIZE)
    ds = SegmentationDataset(cached, radiograph_augment(strength=2.0))
    loader = DataLoader(ds, batch_size=1, num_workers=2, worker_init_fn=_seed_augment_worker)
    xs = [b["x"][0, 0].numpy() for b in loader]
    # Items 0 and 1 come from different workers: without the reseed both would draw the same changes.
    assert not np.array_equal(xs[0], xs[1])


def test_training_input_is_the_worker_preprocessing(tiny_run) -> None:
    folder, _, _ = tiny_run
    samples = read_folder(folder, ("lungs",))
    item = SegmentationDataset(cache_samples(samples[:1], ("lungs",), SIZE))[0]
    x, target, valid = item["x"], item["target"], item["valid"]
    image = np.asarray(Image.open(samples[0].image))
    np.testing.assert_array_equal(x[None], models.preprocess(image, SIZE))
    assert target.shape == (1, SIZE, SIZE) and valid.min() == 1.0


def test_split_keeps_patients_apart(tiny_run) -> None:
    folder, _, _ = tiny_run
    samples = read_folder(folder, ("lungs",))
    train_s, val_s = split(samples, seed=3, val_fraction=0.5)
    assert train_s and val_s
    assert not {s.patient for s in train_s} & {s.patient for s in val_s}
    assert split(samples, seed=3, val_fraction=0.5) == (train_s, val_s)  # deterministic


def test_evaluate_writes_expected_json_and_csv(tiny_run, tmp_path) -> None:
    folder, run, _ = tiny_run
    out = tmp_path / "eval"
    summary = evaluate_segmentation(
        "lung", [folder], out, checkpoint=run / "best.pt", split_file=run / "split.json", subset="train"
    )
    written = json.loads((out / "summary.json").read_text())
    assert written["overall"]["n"] == 8 == summary["overall"]["n"]
    assert set(written["by_source"]) == {"tiny_lungs"}
    for key in ("dice", "iou", "hd95_px"):
        assert key in written["overall"]
    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [f"img{i}" for i in range(8)]
    # Recompute one row by hand through the same prediction path.
    model, spec, _ = load_model("lung", checkpoint=run / "best.pt")
    image = np.asarray(Image.open(folder / "images" / "img0.png"))
    prob, _ = predict(model, spec, image)
    truth = np.asarray(Image.open(folder / "masks" / "lungs" / "img0.png")) > 127
    # The lung is scored as the worker delivers it (its two lungs), the raw mask beside it.
    right, left = split_lungs(prob[0] > 0.5)
    assert float(rows[0]["dice"]) == pytest.approx(dice(right | left, truth), abs=1e-4)
    assert float(rows[0]["dice_raw"]) == pytest.approx(dice(prob[0] > 0.5, truth), abs=1e-4)
    assert float(rows[0]["area_ratio"]) == pytest.approx((right | left).sum() / truth.sum(), abs=1e-4)
    assert written["source_mean"]["area_ratio"] == written["by_source"]["tiny_lungs"]["area_ratio"]
    assert written["overall"]["dice"] > 0.5  # 9 steps on an easy task: clearly learned something


def test_evaluate_runs_the_tta_it_is_given_and_records_it(tiny_run, tmp_path) -> None:
    """--tta reaches the prediction (one row recomputed through workers.tta) and the summary names it;
    --tta-models without the evaluated model leaves it plain."""
    from training.cli import main
    from workers import tta

    folder, run, _ = tiny_run
    common = ["evaluate", "lung", "--data", str(folder), "--checkpoint", str(run / "best.pt"), "--threads", "1"]
    names = ["identity", "scale:1.2", "shift:0.05:0"]
    assert main([*common, "--tta", *names, "--out", str(tmp_path / "tta")]) == 0
    assert main([*common, "--tta", *names, "--tta-models", "opacity", "--out", str(tmp_path / "plain")]) == 0
    with_tta = json.loads((tmp_path / "tta" / "summary.json").read_text())
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert with_tta["tta"] == names and plain["tta"] == []
    model, spec, _ = load_model("lung", checkpoint=run / "best.pt")
    image = np.asarray(Image.open(folder / "images" / "img0.png"))
    truth = np.asarray(Image.open(folder / "masks" / "lungs" / "img0.png")) > 127
    with open(tmp_path / "tta" / "per_image.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["id"] == "img0")
    prob, _ = predict(model, spec, image, tta.parse(names))
    assert float(row["dice_raw"]) == pytest.approx(dice(prob[0] > 0.5, truth), abs=1e-4)
    plain_prob, _ = predict(model, spec, image)
    assert not np.allclose(prob, plain_prob)


def test_exported_weights_give_the_training_output_in_the_runner(tiny_run, tmp_path) -> None:
    folder, run, _ = tiny_run
    out = tmp_path / "eval"
    evaluate_segmentation("lung", [folder], out, checkpoint=run / "best.pt")
    weights = tmp_path / "weights"
    export(
        "lung",
        run / "best.pt",
        out / "summary.json",
        "python -m training evaluate lung ...",
        status="experimental",
        limitations=["tiny test model"],
        weights_dir=weights,
    )
    card = models.read_card("lung", weights)
    assert card["status"] == "experimental" and card["limitations"] == ["tiny test model"]
    assert card["input_size"] == SIZE and card["validation"]["command"].startswith("python -m training")
    assert card["training"]["machine"] and card["code_version"] and card["sha256"]

    trained, spec, _ = load_model("lung", checkpoint=run / "best.pt")
    image = np.asarray(Image.open(folder / "images" / "img3.png"))
    x = models.preprocess(image, spec.input_size)
    with torch.no_grad():
        expected = torch.sigmoid(trained(torch.from_numpy(x))).numpy()
    runner = ModelRunner(
        weights_dir=weights,
        model_names=["lung"],
        device="cpu",
        backend="torch",
        cache_dir=tmp_path / "cache",
        threads=1,
    )
    got = runner.predict("lung", x).mask
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-2)  # fp16 weights
    assert ((got > 0.5) == (expected > 0.5)).mean() > 0.99

    def again(**kwargs: Any) -> Path:
        return export(
            "lung",
            run / "best.pt",
            out / "summary.json",
            "cmd",
            status="experimental",
            limitations=[],
            weights_dir=weights,
            **kwargs,
        )

    # Same validation, not better: the shipped weights stay.
    with pytest.raises(NotBetterError):
        again()
    # A new primary metric cannot be compared with the shipped card's figure: it needs a baseline.
    with pytest.raises(NotBetterError, match="--baseline"):
        again(primary_metric="source_mean.dice")
    summary = json.loads((out / "summary.json").read_text())
    shipped_sha = models.read_card("lung", weights)["sha256"]
    worse, better, stale = tmp_path / "worse.json", tmp_path / "better.json", tmp_path / "stale.json"
    dice_now = summary["source_mean"]["dice"]
    worse.write_text(json.dumps({"source_mean": {"dice": dice_now - 0.1}, "weights_sha256": shipped_sha}))
    better.write_text(json.dumps({"source_mean": {"dice": dice_now + 0.1}, "weights_sha256": shipped_sha}))
    stale.write_text(json.dumps({"source_mean": {"dice": dice_now - 0.1}, "weights_sha256": "0" * 64}))
    with pytest.raises(NotBetterError, match="same evaluation"):
        again(primary_metric="source_mean.dice", baseline=better)
    with pytest.raises(NotBetterError, match="not the shipped"):  # a baseline of other weights proves nothing
        again(primary_metric="source_mean.dice", baseline=stale)
    again(primary_metric="source_mean.dice", baseline=worse)
    card = models.read_card("lung", weights)
    assert card["validation"]["primary_metric"] == "source_mean.dice"
    assert card["validation"]["baseline"]["primary_value"] == pytest.approx(summary["source_mean"]["dice"] - 0.1)


def test_source_mean_counts_each_source_once() -> None:
    from training.evaluate import summarise

    rows = [{"source": "big", "dice": 0.9, "hd95_px": 2.0}] * 4 + [{"source": "small", "dice": 0.5, "hd95_px": 10.0}]
    summary = summarise(rows, ["dice", "hd95_px"])
    assert summary["overall"]["dice"] == pytest.approx(0.82)
    assert summary["source_mean"] == {
        "n_sources": 2,
        "dice": 0.7,
        "dice_worst_source": 0.5,
        "hd95_px": 6.0,
    }


def test_severity_threshold_is_chosen_without_the_test_fold() -> None:
    # Fold 0..3: the zone fractions say "affected" above 0.2; fold 4 alone would prefer another one.
    rows = []
    for fold in range(5):
        for k in range(7):
            fractions = [0.25] * k + [0.1] * (6 - k)
            ref = float(k) if fold < 4 else 0.0
            rows.append(
                {
                    "image_id": f"{fold}-{k}",
                    "fold": fold,
                    "source": "s",
                    "reference": ref,
                    "brixia": None,
                    "fractions": fractions,
                }
            )
    out = cross_validate(rows)
    assert out["cv_per_fold"]["0"]["mae"] == 0.0
    assert 0.1 <= out["cv_per_fold"]["4"]["threshold"] < 0.25  # picked on folds 0-3 only
    assert out["cv_per_fold"]["4"]["mae"] == pytest.approx(3.0)  # so fold 4 is scored honestly


def test_split_file_lists_every_image(tiny_run) -> None:
    _, run, _ = tiny_run
    sides = read_split(run / "split.json")
    assert len(sides["train"]) == 8


def test_pneumothorax_presence_follows_the_worker_rule(tmp_path) -> None:
    """Presence below its threshold empties the mask (as the worker reports it), per source."""
    from tests.support.tiny_models import write_tiny_weights

    positives = lung_folder(tmp_path / "ptx", n=4)
    (positives / "masks" / "lungs").rename(positives / "masks" / "pneumothorax")
    negatives = lung_folder(tmp_path / "normals", n=4)
    weights = write_tiny_weights(
        tmp_path / "w", names=("pneumothorax",), head_logits={"pneumothorax": (5.0, -5.0)}
    )  # mask everywhere, presence ~0.007
    out = tmp_path / "eval"
    summary = evaluate_segmentation("pneumothorax", [positives], out, weights_dir=weights, negatives=[negatives])
    by_source = summary["by_source"]
    assert by_source["normals"]["presence_correct"] == 1.0 and by_source["normals"]["dice"] == 1.0
    assert by_source["ptx"]["presence_correct"] == 0.0 and by_source["ptx"]["dice"] == 0.0
    assert summary["dice_positives"]["n"] == 4


@pytest.mark.parametrize("angle", [0, 15])
def test_side_scores_use_the_patient_convention(tmp_path, angle: int) -> None:
    """JSRT/SCR side masks are in the PATIENT sense: the right lung is on the image's left."""
    from training.data import Sample
    from training.evaluate import _side_metrics

    shape = (120, 100)
    image_left = ellipse(shape, 60, 30, 35, 14)
    image_right = ellipse(shape, 60, 70, 35, 14)
    if angle:

        def rot(m: np.ndarray) -> np.ndarray:
            return np.asarray(Image.fromarray(m.astype(np.uint8) * 255).rotate(angle)) > 127

        image_left, image_right = rot(image_left), rot(image_right)
    folder = tmp_path / "jsrt_like"
    for side, mask in (("right_lung", image_left), ("left_lung", image_right)):
        (folder / "masks" / side).mkdir(parents=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / side / "x.png")
    sample = Sample("jsrt_like", "x", folder / "images" / "x.png", {}, "x")
    # The worker's rule makes the two sides of one lung mask; the scores follow the patient convention.
    scores = _side_metrics(sample, *split_lungs(image_left | image_right), shape)
    assert scores == {"dice_right": 1.0, "dice_left": 1.0}
    one_lung = _side_metrics(sample, *split_lungs(image_left), shape)  # only the patient's right lung found
    assert one_lung == {"dice_right": 1.0, "dice_left": 0.0}


def test_opacity_pixel_threshold_is_tuned_with_the_zone_threshold() -> None:
    """Only the fractions measured at pixel threshold 0.3 carry the signal: the CV must pick 0.3."""
    rows = []
    for fold in range(5):
        for k in range(7):
            signal = [0.6] * k + [0.05] * (6 - k)
            rows.append(
                {
                    "image_id": f"{fold}-{k}",
                    "fold": fold,
                    "source": "s",
                    "reference": float(k),
                    "brixia": None,
                    "fractions": [0.0] * 6,
                    "fractions_by_pixel": {0.3: signal, 0.5: [0.0] * 6},
                }
            )
    out = cross_validate(rows)
    assert out["opacity_threshold"] == 0.3
    assert 0.05 <= out["zone_threshold"] < 0.6
    assert out["cv"]["mae"] == 0.0


def test_cards_name_the_shared_data_without_this_machines_path(monkeypatch) -> None:
    from training.tasks import portable, shared_data_root

    monkeypatch.delenv("CXR_SHARED_DATA", raising=False)
    root = str(shared_data_root())
    card = {"data": [f"{root}/lung/jsrt"], "weak": {"data": f"{root}/severity"}, "epochs": 3, "note": "runs/x"}
    assert portable(card) == {
        "data": ["../shared/data/lung/jsrt"],
        "weak": {"data": "../shared/data/severity"},
        "epochs": 3,
        "note": "runs/x",
    }
    for name in ("lung", "opacity", "pneumothorax"):  # the shipped cards too
        assert root not in models.card_path(name).read_text()


def test_selection_by_sources_weighs_each_source_once() -> None:
    from training.train import selection_dice

    by_source = {"big": [0.9, 0.9, 0.9, 0.9], "small": [0.5]}
    assert selection_dice(0.82, by_source, "images") == 0.82
    assert selection_dice(0.82, by_source, "sources") == pytest.approx(0.7)
    assert selection_dice(0.82, {}, "sources") == 0.82
    with pytest.raises(ValueError, match="select_by"):
        selection_dice(0.82, by_source, "patients")


def test_another_tasks_weights_start_the_network_and_leave_its_own_head_untrained() -> None:
    """A lung model (no classification head) starts a pneumothorax model (with one): everything the
    lung model has is copied, the head keeps its random start and is named."""
    from training.train import load_initial

    lung = models.build(dataclasses.replace(models.SPECS["lung"], input_size=SIZE))
    ptx_spec = dataclasses.replace(models.SPECS["pneumothorax"], input_size=SIZE)
    assert ptx_spec.aux_classification and not models.SPECS["lung"].aux_classification
    ptx = models.build(ptx_spec)
    head_before = {k: v.clone() for k, v in ptx.state_dict().items() if k.startswith("classification_head")}

    untrained = load_initial(ptx, lung.state_dict())

    assert untrained == sorted(head_before) and untrained
    for k, v in lung.state_dict().items():
        assert torch.equal(ptx.state_dict()[k], v), k
    for k, v in head_before.items():
        assert torch.equal(ptx.state_dict()[k], v), k


def test_initial_weights_of_another_network_are_refused() -> None:
    from training.train import load_initial

    lung = models.build(dataclasses.replace(models.SPECS["lung"], input_size=SIZE))
    state = lung.state_dict()
    with pytest.raises(ValueError, match="shape differs"):  # another encoder width or channel count
        load_initial(models.build(models.SPECS["lung"]), {**state, "encoder.conv1.weight": torch.zeros(64, 3, 7, 7)})
    with pytest.raises(ValueError, match="missing"):  # an encoder that does not come whole
        load_initial(lung, {k: v for k, v in state.items() if k != "encoder.layer1.0.conv1.weight"})
    ptx = models.build(dataclasses.replace(models.SPECS["pneumothorax"], input_size=SIZE))
    with pytest.raises(ValueError, match="unknown"):  # a head this network lacks
        load_initial(lung, ptx.state_dict())


def test_positives_are_repeated_and_negatives_kept_once(tiny_run) -> None:
    from training.train import with_repeats

    folder, _, _ = tiny_run
    cached = cache_samples(read_folder(folder, ("lungs",))[:3], ("lungs",), SIZE)
    empty = dataclasses.replace(cached[0], target=np.zeros_like(cached[0].target), positive=0.0)
    repeated = with_repeats([*cached, empty], 3)
    assert len(repeated) == 3 * 3 + 1
    assert sum(c is empty for c in repeated) == 1
    assert with_repeats(cached, 1) == cached
    with pytest.raises(ValueError, match="at least 1"):
        with_repeats(cached, 0)


def test_a_card_pins_the_shipped_weights_its_training_started_from(tiny_run) -> None:
    """`--init lung` names a model whose weights change with each release: the card keeps the version."""
    from training.export import build_card

    _, run, _ = tiny_run
    config = json.loads((run / "config.json").read_text())
    assert config["initialised_from"] == "random"  # recorded by train when the run started
    lung = json.loads(models.card_path("lung").read_text())
    evaluation = {"overall": {"dice": 0.9}}
    recorded = "lung (shipped weights 2026-01-01-abc, sha256 00)"  # what `lung` was when a run began
    for init, started, expected in (
        ("", None, "random"),
        ("runs/x/best.pt", None, "runs/x/best.pt"),
        ("lung", None, lung["version"]),  # a run from before train recorded it: described at export
        ("lung", recorded, recorded),
    ):
        (run / "config.json").write_text(json.dumps({**config, "init": init, "initialised_from": started}))
        try:
            card = build_card(
                run, evaluation, "cmd", status="experimental", limitations=[], extra={}, primary_metric="overall.dice"
            )
        finally:
            (run / "config.json").write_text(json.dumps(config))
        assert expected in card["training"]["initialised_from"]
        assert ("from scratch" in card["encoder_weights"]) == (not init)
        if init == "lung" and started is None:
            assert lung["sha256"] in card["training"]["initialised_from"]


def test_a_fine_tune_keeps_the_input_size_of_the_weights_it_starts_from(tiny_run) -> None:
    """The task default (lung: 160) is for runs from scratch; `--init` weights bring their own size."""
    from training.cli import build_parser, train_config

    _, run, _ = tiny_run
    shipped = json.loads(models.card_path("lung").read_text())["input_size"]

    def size(*argv: str) -> int:
        return train_config(build_parser().parse_args(["train", "lung", *argv])).spec.input_size

    assert size() == models.SPECS["lung"].input_size
    assert size("--init", "lung") == shipped
    assert size("--init", str(run / "best.pt")) == SIZE
    assert size("--init", "lung", "--input-size", "384") == 384


def test_a_split_seed_keeps_the_images_while_the_seed_changes(tiny_run) -> None:
    from training.train import collect_samples

    folder, _, _ = tiny_run
    base = TrainConfig(
        spec=models.SPECS["lung"],
        structures=("lungs",),
        data=[folder],
        run_dir=Path("unused"),
        negatives=[folder],
        negatives_per_source=3,
        val_fraction=0.5,
    )

    def drawn(cfg: TrainConfig) -> tuple[list[tuple[str, bool]], ...]:
        train_s, val_s = split(collect_samples(cfg), cfg.data_seed, cfg.val_fraction)
        return tuple([(s.id, s.masks["lungs"] is None) for s in side] for side in (train_s, val_s))

    assert drawn(dataclasses.replace(base, seed=7, split_seed=0)) == drawn(base)
    # Without it the seed draws other negatives and another split (hash-based: no chance involved).
    assert any(drawn(dataclasses.replace(base, seed=s)) != drawn(base) for s in range(1, 6))


def test_the_schedule_ends_with_whichever_limit_ends_the_run() -> None:
    from training.train import lr_at, schedule_progress

    # 460 steps of --epochs done in 79 s of a 360 s budget: the epochs end the run, so the schedule ends.
    assert schedule_progress(460, 79.0, total_steps=460, budget_s=360.0) == 1.0
    # The budget spent after a fifth of the steps: the budget ends it.
    assert schedule_progress(92, 360.0, total_steps=460, budget_s=360.0) == 1.0
    assert schedule_progress(230, 36.0, total_steps=460, budget_s=360.0) == 0.5
    assert schedule_progress(230, 36.0, total_steps=460, budget_s=0.0) == 0.5
    cfg = TrainConfig(spec=models.SPECS["lung"], structures=("lungs",), data=[], run_dir=Path("unused"), lr=1e-3)
    assert lr_at(460, schedule_progress(460, 79.0, 460, 360.0), cfg) == pytest.approx(2e-5)  # 2 % of lr
