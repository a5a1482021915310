"""`python -m training pack` and training/recipes/on_device.sh: a campaign carried to a lent accelerator.

A tiny synthetic data root stands in for ../shared/data: a labelled folder (one image with an ignore
mask) and a negatives folder of which the recipe draws three. The pack must hold exactly the samples
`train` would read, at the job's input size, read back through the recipe it writes; a pack that does
not is refused; and the device script runs the packed campaign and leaves what the device tool can
return (small files, checkpoints in parts) that reassemble into a loadable checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.synthetic_lungs import lung_folder
from training import pack as packing
from training.campaign import load_recipe
from training.cli import build_parser, main, train_config
from training.predict import load_model
from training.train import collect_samples

REPO = Path(__file__).resolve().parents[2]
SIZE = 32
RECIPE = """
minutes = 0.5
[[job]]
name = "small"
train = ["lung", "--data", "{data}/lungs/tiny", "--negatives", "{data}/others", "--negatives-per-source", "3",
         "--input-size", "32", "--epochs", "2", "--max-steps", "2", "--batch-size", "4", "--threads", "1",
         "--no-augment"]
evaluate = [["evaluate", "lung", "--data", "{data}/lungs/tiny", "--checkpoint", "{checkpoint}"]]
checkpoint = "last"
"""
RECIPE_OPTIONS = ["--negatives-per-source", "3", "--input-size", "32"]  # what decides the samples


@pytest.fixture()
def data(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    tiny = lung_folder(root / "lungs" / "tiny", n=8)
    (tiny / "masks" / "ignore").mkdir()
    Image.fromarray(np.eye(80, 72, dtype=np.uint8) * 255).save(tiny / "masks" / "ignore" / "img1.png")
    lung_folder(root / "others", n=10, shape=(40, 40))
    monkeypatch.setenv("CXR_SHARED_DATA", str(root))
    return root


def _configure(argv: list[str]):
    return train_config(build_parser().parse_args(["train", *argv]))


def test_pack_holds_what_train_reads_at_its_input_size(data, tmp_path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "pack"
    assert main(["pack", str(recipe), "--out", str(out)]) == 0

    info = json.loads((out / "pack.json").read_text())
    job = info["jobs"]["small"]
    assert job["images"] == 8 + 3 and job["input_size"] == SIZE and job["carry"] is None
    assert job["checkpoint"] == "last.fp16.pt"
    assert job["evaluate_after"] == [
        "python -m training evaluate lung --data $CXR_SHARED_DATA/lungs/tiny --checkpoint {checkpoint}"
    ]
    images = sorted((out / "small").rglob("images/*"))
    assert len(images) == 11 and all(p.suffix == ".jpg" for p in images)
    assert {Image.open(p).size for p in [*images, *(out / "small").rglob("masks/*/*.png")]} == {(SIZE, SIZE)}
    assert (out / "small" / "lungs" / "tiny" / "masks" / "ignore" / "img1.png").exists()

    # The negatives are the three `train` draws, and the written recipe reads them from the pack.
    original = _configure(["lung", "--data", f"{data}/lungs/tiny", "--negatives", f"{data}/others", *RECIPE_OPTIONS])
    drawn = {s.id for s in collect_samples(original) if s.source == "others"}
    with open(out / "small" / "others" / "index.csv", newline="") as f:
        assert {r["id"] for r in csv.DictReader(f)} == drawn
    packed = load_recipe(out / "recipe.toml")
    assert packed.minutes == 0.5 and packed.jobs[0].evaluate == [] and packed.jobs[0].checkpoint == "last"
    args = [a.format(data=out) for a in packed.jobs[0].train]
    assert f"{out}/small/others" in args and f"{out}/small/lungs/tiny" in args
    there = collect_samples(_configure(args))
    assert sorted(s.id for s in there) == sorted(s.id for s in collect_samples(original))

    assert main(["pack", str(recipe), "--out", str(tmp_path / "p2"), "--max-mib", "0.001"]) == 1
    assert main(["pack", str(recipe), "--out", str(out)]) == 0  # an earlier pack is replaced
    (tmp_path / "runs" / "keep").mkdir(parents=True)
    assert main(["pack", str(recipe), "--out", str(tmp_path / "runs")]) == 2  # anything else is not
    assert (tmp_path / "runs" / "keep").exists()


def test_a_pack_that_would_train_on_other_samples_is_refused(data, tmp_path, monkeypatch) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    real = packing.pack_folder

    def losing_one(folder, target, samples, size, quality):  # type: ignore[no-untyped-def]
        return real(folder, target, samples[1:], size, quality)

    monkeypatch.setattr(packing, "pack_folder", losing_one)
    with pytest.raises(packing.PackMismatchError, match="small"):
        packing.pack(load_recipe(recipe), _configure, data, tmp_path / "pack")


@pytest.mark.timeout(600)
def test_device_script_runs_the_packed_campaign_and_leaves_returnable_files(data, tmp_path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    assert main(["pack", str(recipe), "--out", str(tmp_path / "pack")]) == 0
    archive = tmp_path / "pack.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "pack", arcname=".")
    out = tmp_path / "out"
    out.mkdir()
    env = {
        **os.environ,
        "OUT": str(out),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),  # where the script unpacks and trains (mktemp -d)
    }
    env.pop("CXR_SHARED_DATA")  # the script points it at the unpacked pack
    done = subprocess.run(
        ["bash", "training/recipes/on_device.sh", str(archive)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    files = sorted(p.name for p in out.iterdir())
    assert "small.tgz" in files and all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())
    home = tmp_path / "home"
    with tarfile.open(out / "small.tgz") as tar:
        tar.extractall(home, filter="data")
    assert json.loads((home / "campaign.json").read_text())["jobs"]["small"]["train_exit"] == 0
    parts = b"".join((out / name).read_bytes() for name in files if name.startswith("ckpt.part."))
    (tmp_path / "ckpt.tar").write_bytes(parts)
    with tarfile.open(tmp_path / "ckpt.tar") as tar:
        tar.extractall(home, filter="data")
    returned = home / "small" / "last.fp16.pt"  # the recipe's `checkpoint`, without optimizer state
    assert set(torch.load(returned, weights_only=False)) == {"model", "spec", "state"}
    _, spec, _ = load_model("lung", checkpoint=returned)
    assert spec.input_size == SIZE
    assert [Path(d).parts[-3:] for d in json.loads((home / "small" / "config.json").read_text())["data"]] == [
        ("small", "lungs", "tiny")
    ]
    assert next(iter(torch.load(returned)["model"].values())).dtype == torch.float16


def test_the_device_recipe_packs_within_what_the_device_tool_carries(tmp_path, monkeypatch) -> None:
    """device15.toml's header promises a pack of at most 29 MiB at JPEG 80 with only the lung weights to
    carry besides: with the tracked tree less its weights and the wheels, under the tool's 64 MiB."""
    monkeypatch.delenv("CXR_SHARED_DATA", raising=False)
    recipe = REPO / "training" / "recipes" / "device15.toml"
    assert main(["pack", str(recipe), "--out", str(tmp_path / "pack"), "--jpeg-quality", "80", "--max-mib", "29"]) == 0
    assert json.loads((tmp_path / "pack" / "pack.json").read_text())["carry"] == ["workers/weights/lung.safetensors"]
