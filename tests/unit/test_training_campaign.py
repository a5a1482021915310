"""`python -m training campaign`: a recipe's trainings side by side, each evaluated, small files out.

Real `train`/`evaluate` processes on a tiny synthetic lung folder (the data root given as
$CXR_SHARED_DATA, as on a lent machine): both jobs train at once, each is evaluated, a failing job is
reported without stopping the other, and the fp16 checkpoint left behind gives the network's output.
Recipe mistakes are refused before anything starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.synthetic_lungs import lung_folder
from training.campaign import load_recipe
from training.cli import build_parser, main
from training.predict import load_model
from workers import models

RECIPE = """
minutes = 0.5
[[job]]
name = "small"
train = ["lung", "--data", "{data}/tiny", "--input-size", "64", "--epochs", "2", "--max-steps", "2",
         "--batch-size", "4", "--threads", "1", "--no-augment"]
evaluate = [["evaluate", "lung", "--data", "{data}/tiny", "--checkpoint", "{checkpoint}",
             "--split", "{run}/split.json", "--subset", "validation", "--threads", "1"]]
[[job]]
name = "broken"
train = ["lung", "--data", "{data}/missing", "--input-size", "64", "--epochs", "1", "--threads", "1"]
evaluate = [["evaluate", "lung", "--checkpoint", "{checkpoint}"]]
"""


@pytest.mark.timeout(600)
def test_campaign_trains_side_by_side_evaluates_and_reports_failures(tmp_path, monkeypatch) -> None:
    data = tmp_path / "data"
    lung_folder(data / "tiny", n=8)
    monkeypatch.setenv("CXR_SHARED_DATA", str(data))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "campaign"

    assert main(["campaign", str(recipe), "--out", str(out)]) == 1  # one job failed

    result = json.loads((out / "campaign.json").read_text())
    assert result["failed"] == ["broken"]
    small = result["jobs"]["small"]
    assert small["train_exit"] == 0 and small["epochs"] == 2
    assert small["evaluations"]["eval0"]["exit"] == 0
    summary = json.loads((out / small["evaluations"]["eval0"]["summary"]).read_text())
    assert summary["checkpoint"] == str(out / "small" / "best.pt") and summary["subset"] == "validation"
    config = json.loads((out / "small" / "config.json").read_text())
    assert config["max_minutes"] == 0.5 and config["run_dir"] == str(out / "small")
    assert result["jobs"]["broken"]["train_exit"] != 0 and result["jobs"]["broken"]["checkpoint_fp16"] is None
    assert "missing" in (out / "broken" / "train.log").read_text()

    # The fp16 copy is a checkpoint like best.pt, with its network's output to fp16 precision.
    full, spec, _ = load_model("lung", checkpoint=out / "small" / "best.pt")
    half, half_spec, _ = load_model("lung", checkpoint=out / small["checkpoint_fp16"])
    assert half_spec == spec
    assert all(
        v.dtype == torch.float16
        for v in torch.load(out / small["checkpoint_fp16"])["model"].values()
        if v.is_floating_point()
    )
    x = torch.from_numpy(models.preprocess(np.full((80, 72), 100, np.uint8), spec.input_size))
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(half(x)), torch.sigmoid(full(x)), atol=2e-2, rtol=0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[job]]\nname = "a"\ntrain = ["lung"]\n', "minutes"),
        ('minutes = 1\n[[job]]\nname = "a b"\ntrain = ["lung"]\n', "job name"),
        ('minutes = 1\n[[job]]\nname = "a"\n', "no `train`"),
        ('minutes = 1\n[[job]]\nname = "a"\ntrain = ["lung", "--run", "x"]\n', "campaign sets these"),
        ('minutes = 1\n[[job]]\nname = "a"\ntrain = ["lung"]\nevaluate = [["export", "lung"]]\n', "evaluate or"),
        ('minutes = 1\n[[job]]\nname = "a"\ntrain = ["lung"]\n[[job]]\nname = "a"\ntrain = ["lung"]\n', "unique"),
        ("minutes = 1\n", "at least one job"),
        ('minutes = 1\n[[job]]\nname = "a"\ntrain = ["lung"]\ncheckpoint = "middle"\n', "checkpoint must be"),
    ],
)
def test_recipe_mistakes_are_refused_before_anything_runs(tmp_path, text, message) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_recipe(recipe)
    assert main(["campaign", str(recipe), "--out", str(tmp_path / "out")]) == 2


RECIPES = sorted((Path(__file__).resolve().parents[2] / "training" / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_gpu_recipes_are_valid(path: Path) -> None:
    recipe = load_recipe(path)
    # Training plus evaluation must leave the lease's start-up and transfers room in 15 minutes.
    assert recipe.minutes <= 10
    parser = build_parser()  # every argument is one the commands take (argparse exits otherwise)
    for job in recipe.jobs:
        fill = {"data": "d", "run": "r", "checkpoint": "r/best.pt"}
        parser.parse_args(["train", *(a.format(**fill) for a in job.train), "--run", "r", "--max-minutes", "9"])
        for cmd in job.evaluate:
            parser.parse_args([*(a.format(**fill) for a in cmd), "--out", "o"])


def test_issue_16_recipes_cover_all_three_models() -> None:
    tasks = {j.train[0] for p in RECIPES for j in load_recipe(p).jobs}
    assert tasks == {"lung", "opacity", "pneumothorax"}
