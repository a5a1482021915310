"""What a campaign's trainings read, packed small enough to travel to a lent accelerator.

A lent GPU comes for minutes and through a narrow door: this workplace's device tool carries at most
64 MiB of working tree and returns files of at most 16 MiB, and the machine has no copy of
../shared/data (about 190 MB). Most of those bytes never reach a network: `train` resizes every image
to its input size before the first step (`cache_samples`), and of a negatives folder it draws
`--negatives-per-source` images. So each job gets its own folder holding, per data folder, only the
samples that `collect_samples` (the code `train` runs) chooses, each image stored at the job's input
size (JPEG, or PNG with `jpeg_quality=0`), masks resized as `cache_samples` resizes them. The resize of
an image already at the input size is the identity, so the training there sees what it would see here
but for the JPEG noise; weak-label images also reach the lung model (for their zones) at that size.

The pack is checked before it is trusted: the same arguments read from it must give the same samples
and the same patient split, or `pack` raises. It writes `recipe.toml` (the recipe with `{data}` pointing
into each job's folder and no evaluations: those read whole folders, so they run on the CPU machine on
the returned checkpoints; `pack.json` lists them) and `pack.json` (samples, bytes, the files to carry
besides the pack, e.g. the shipped weights an `--init` names).
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from training.campaign import Job, Recipe, fill, fp16_name, load_recipe
from training.data import (
    IGNORE,
    Sample,
    index_file,
    load_gray,
    load_mask,
    read_rows,
    resize_image,
    resize_mask,
    row_id,
)
from training.splits import split
from training.tasks import portable
from training.train import TrainConfig, collect_samples, read_weak
from workers.models import weights_path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


class PackMismatchError(ValueError):
    """The packed folders would not give the training the samples the shared data gives it."""


def weak_samples(cfg: TrainConfig) -> list[Sample]:
    """The weak-label samples `train` reads (every fold it trains or validates on)."""
    folds = sorted({*cfg.weak_train_folds, *cfg.weak_val_folds})
    return [s for folder in cfg.weak_data for s in read_weak(folder, folds)]


def _fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    samples = collect_samples(cfg)
    _, val = split(samples, cfg.data_seed, cfg.val_fraction)
    weak = weak_samples(cfg)
    return {
        "samples": sorted((s.source, s.id, s.patient) for s in samples),
        "validation": sorted((s.source, s.id) for s in val),
        "weak": sorted((s.source, s.id, s.patient) for s in weak),
        "masks": sorted((s.source, s.id, st) for s in samples for st, m in s.masks.items() if m is not None),
        "ignore": sorted((s.source, s.id) for s in samples if s.ignore),
    }


def _store_image(source: Path, target: Path, size: int, jpeg_quality: int) -> tuple[int, int]:
    """Store `source` at most `size` px square in `target`; returns the original's shape (its masks')."""
    image = load_gray(source)
    shape = (image.shape[0], image.shape[1])
    if max(shape) > size:  # never upsample: `cache_samples` does that from the original
        image = resize_image(image, size)
    elif source.suffix.lower() == target.suffix.lower():
        shutil.copyfile(source, target)
        return shape
    if jpeg_quality:
        Image.fromarray(image).save(target, quality=jpeg_quality)
    else:
        Image.fromarray(image).save(target)
    return shape


def _store_mask(source: Path, target: Path, image_shape: tuple[int, int], size: int) -> None:
    mask = load_mask(source, image_shape)
    if max(image_shape) > size:
        mask = resize_mask(mask, size)
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(target)


def pack_folder(folder: Path, target: Path, samples: Sequence[Sample], size: int, jpeg_quality: int) -> int:
    """Write `samples` of shared-format `folder` into `target` in the same format; returns images written."""
    chosen = {s.id: s for s in samples}
    rows = [r for r in read_rows(folder) if row_id(r) in chosen]
    (target / "images").mkdir(parents=True, exist_ok=True)
    suffix = ".jpg" if jpeg_quality else ".png"
    for row in rows:
        sample = chosen[row_id(row)]
        image = Path("images") / f"{sample.id}{suffix}"
        shape = _store_image(sample.image, target / image, size, jpeg_quality)
        row["image_path"] = str(image)
        for structure, mask in sample.masks.items():
            if mask is not None:
                _store_mask(mask, target / "masks" / structure / f"{sample.id}.png", shape, size)
        if sample.ignore:
            _store_mask(sample.ignore, target / "masks" / IGNORE / f"{sample.id}.png", shape, size)
    fields = list(rows[0]) if rows else ["id", "image_path"]
    with open(target / index_file(folder).name, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    if (folder / "README.md").exists():
        shutil.copyfile(folder / "README.md", target / "README.md")
    return len(rows)


def _packed_folder(folder: Path, data_root: Path, job_root: Path) -> Path:
    """Where `folder` goes in a job's pack: the same path under the data root (the folder's name is
    part of what `train` reads: the negatives draw is seeded by it, sources are named by it)."""
    try:
        return job_root / folder.resolve().relative_to(data_root.resolve())
    except ValueError:
        return job_root / folder.name


def carried_init(init: str) -> str | None:
    """The file an `--init` needs on the other machine (a shipped model's weights, or a checkpoint)."""
    if not init:
        return None
    if init.endswith(".pt"):
        return init
    path = weights_path(init).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def pack_job(job: Job, cfg: TrainConfig, data_root: Path, out: Path, jpeg_quality: int) -> dict[str, Any]:
    """Pack one job's samples under out/<job> (`pack` checks them)."""
    job_root = out / job.name
    size = cfg.spec.input_size
    samples = collect_samples(cfg)
    weak = weak_samples(cfg)
    images = 0
    for folder in dict.fromkeys([*cfg.data, *cfg.negatives, *cfg.weak_data]):  # a folder listed twice packs once
        inside = [s for s in [*samples, *weak] if s.image.resolve().is_relative_to(folder.resolve())]
        images += pack_folder(folder, _packed_folder(folder, data_root, job_root), inside, size, jpeg_quality)
    nbytes = sum(p.stat().st_size for p in job_root.rglob("*") if p.is_file())
    log.info("pack %s: %d images at %d px, %.1f MiB", job.name, images, size, nbytes / 2**20)
    return {
        "input_size": size,
        "images": images,
        "samples": len(samples),
        "weak_samples": len(weak),
        "bytes": nbytes,
        "checkpoint": fp16_name(job.checkpoint),
        "carry": carried_init(cfg.init),
        # Run where the data is, with {run} the returned job folder and {checkpoint} its fp16 copy.
        "evaluate_after": [
            portable("python -m training " + " ".join(cmd).replace("{data}", str(data_root))) for cmd in job.evaluate
        ],
    }


def _toml_list(values: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"  # JSON strings are TOML basic strings


FOLDER_OPTIONS = ("--data", "--negatives", "--weak-data")


def _without_folders(args: Sequence[str]) -> list[str]:
    """`train` arguments less the folder options and their values (values never start with '--')."""
    out: list[str] = []
    skipping = False
    for a in args:
        if a.startswith("--"):
            skipping = a.split("=")[0] in FOLDER_OPTIONS
        if not skipping:
            out.append(a)
    return out


def packed_train_args(job: Job, cfg: TrainConfig, data_root: Path) -> list[str]:
    """The job's `train` arguments reading its pack: every folder explicit (a task's default folders
    would otherwise be looked up at the top of the pack), as `{data}/<job>/<path under the data root>`."""

    def there(folders: Sequence[Path]) -> list[str]:
        return ["{data}/" + str(_packed_folder(f, data_root, Path(job.name))) for f in folders]

    args = [*_without_folders(job.train), "--data", *there(cfg.data), "--negatives", *there(cfg.negatives)]
    return args + (["--weak-data", *there(cfg.weak_data)] if cfg.weak_data else [])


def packed_recipe(recipe: Recipe, configs: dict[str, TrainConfig], data_root: Path) -> str:
    """The recipe reading each job's pack, without the evaluations (they run where the data is)."""
    lines = [
        "# Written by `python -m training pack`: run with CXR_SHARED_DATA=<the pack folder>.",
        f"minutes = {recipe.minutes}",
    ]
    for job in recipe.jobs:
        train = packed_train_args(job, configs[job.name], data_root)
        lines += ["", "[[job]]", f"name = {json.dumps(job.name)}", f"train = {_toml_list(train)}"]
        lines.append(f"checkpoint = {json.dumps(job.checkpoint)}")
    return "\n".join(lines) + "\n"


Configure = Callable[[list[str]], TrainConfig]  # `train` arguments (task first) -> the run


def pack(recipe: Recipe, configure: Configure, data_root: Path, out: Path, jpeg_quality: int = 90) -> dict[str, Any]:
    """Pack every job of `recipe` into `out`; `configure` makes a run of `train` arguments as `train`
    does. Raises PackMismatchError unless the written recipe, read from the pack, trains on the same
    samples, validation split and weak labels as the original recipe on `data_root`."""
    if out.exists():
        if any(out.iterdir()) and not (out / "pack.json").exists():
            raise ValueError(f"{out} is neither empty nor an earlier pack (no pack.json): not replacing it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    configs = {job.name: configure(fill(job.train, out / job.name, data_root)) for job in recipe.jobs}
    jobs = {job.name: pack_job(job, configs[job.name], data_root, out, jpeg_quality) for job in recipe.jobs}
    (out / "recipe.toml").write_text(packed_recipe(recipe, configs, data_root))
    for job in load_recipe(out / "recipe.toml").jobs:
        here, there = _fingerprint(configs[job.name]), _fingerprint(configure(fill(job.train, out / job.name, out)))
        for key in here:
            if here[key] != there[key]:
                raise PackMismatchError(f"job {job.name}: the pack gives other {key} than {data_root}")
    result = {
        "data_root": str(data_root),
        "jpeg_quality": jpeg_quality,
        "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        "carry": sorted({j["carry"] for j in jobs.values() if j["carry"]}),
        "jobs": jobs,
    }
    (out / "pack.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
