"""`python -m training soup`: weighted parameter means of one architecture (training.soup).

A hand-computed mean, the refusals (other parameters, other shapes, bad weights), and the command on
real smp networks: shipped fp16 weights and a checkpoint in, a checkpoint out that `load_model` (and so
evaluate/calibrate/export) reads and whose outputs are those of the expected mean network.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from training.cli import main
from training.predict import load_model
from training.soup import SoupError, average_state_dicts
from workers import models

SIZE = 64


def test_mean_is_weighted_for_floats_and_first_for_integers() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "bn.num_batches_tracked": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, 6.0]), "bn.num_batches_tracked": torch.tensor(9)}
    out = average_state_dicts([a, b], [1.0, 3.0])  # normalised: 0.25 and 0.75
    torch.testing.assert_close(out["w"], torch.tensor([2.5, 5.0]))
    assert out["bn.num_batches_tracked"].item() == 5


def test_fp16_ingredients_are_averaged_in_fp32() -> None:
    a = {"w": torch.tensor([1.0], dtype=torch.float16)}
    b = {"w": torch.tensor([2.0])}
    out = average_state_dicts([a, b], [1.0, 1.0])
    assert out["w"].dtype == torch.float32 and out["w"].item() == 1.5


@pytest.mark.parametrize(
    ("states", "weights", "message"),
    [
        ([{"w": torch.zeros(2)}, {"v": torch.zeros(2)}], [1.0, 1.0], "other parameters"),
        ([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], [1.0, 1.0], "shapes differ"),
        ([{"w": torch.zeros(2)}, {"w": torch.zeros(2)}], [1.0, -1.0], "positive sum"),
        ([{"w": torch.zeros(2)}, {"w": torch.zeros(2)}], [0.0, 0.0], "positive sum"),
        ([{"w": torch.zeros(2)}], [1.0, 1.0], "1 ingredients but 2 weights"),
    ],
)
def test_ingredients_that_cannot_be_averaged_are_refused(states, weights, message) -> None:
    with pytest.raises(SoupError, match=message):
        average_state_dicts(states, weights)


def _checkpoint(path: Path, spec: models.ModelSpec, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.build(spec).eval()
    torch.save({"model": model.state_dict(), "spec": dataclasses.asdict(spec)}, path)
    return model


def test_soup_command_mixes_shipped_weights_and_a_checkpoint(tmp_path) -> None:
    spec = dataclasses.replace(models.SPECS["lung"], input_size=SIZE)
    shipped = _checkpoint(tmp_path / "shipped.pt", spec, seed=0)
    weights = tmp_path / "weights"
    models.save(shipped, spec, {"threshold": 0.5, "status": "experimental"}, weights)
    tuned = _checkpoint(tmp_path / "tuned.pt", spec, seed=1)

    out = tmp_path / "soup" / "mix.pt"
    tuned_path = str(tmp_path / "tuned.pt")
    rc = main(
        ["soup", "lung", "shipped", tuned_path, "--weights", "1", "3", "--weights-dir", str(weights), "--out", str(out)]
    )
    assert rc == 0
    soup, soup_spec, _ = load_model("lung", checkpoint=out)
    assert soup_spec == spec
    assert torch.load(out, weights_only=False)["soup"] == {
        "ingredients": ["shipped", str(tmp_path / "tuned.pt")],
        "weights": [1.0, 3.0],
    }
    fp16 = {k: v.half().float() if v.is_floating_point() else v for k, v in shipped.state_dict().items()}
    for key, value in soup.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.25 * fp16[key] + 0.75 * tuned.state_dict()[key])

    # One ingredient: the network itself, output for output.
    x = torch.from_numpy(models.preprocess(np.full((80, 90), 120, np.uint8), SIZE))
    alone = tmp_path / "alone.pt"
    assert main(["soup", "lung", str(tmp_path / "tuned.pt"), "--out", str(alone)]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_model("lung", checkpoint=alone)[0](x), tuned(x))


def test_soup_of_different_architectures_is_refused(tmp_path) -> None:
    small = dataclasses.replace(models.SPECS["lung"], input_size=SIZE)
    _checkpoint(tmp_path / "a.pt", small, seed=0)
    _checkpoint(tmp_path / "b.pt", dataclasses.replace(small, input_size=2 * SIZE), seed=0)
    assert main(["soup", "lung", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()
