"""Several trainings side by side on one accelerator, each evaluated, small files out: one command.

A lent GPU comes for minutes (15 here, start-up included), so the work has to be prepared before:
a recipe (TOML, `training/recipes/`) lists jobs, each a `python -m training train` command and the
`python -m training evaluate|calibrate` commands that score it against the shipped weights on the
same images. `run_campaign` starts every training at once with the recipe's wall-clock budget
(`--max-minutes`: the cosine schedule ends in time however fast the machine is), then runs the
evaluations, and leaves per job what a CPU machine needs to decide and `export`: config, split,
history, the evaluation summaries and an fp16 copy of best.pt (half the size; the shipped weights are
fp16 anyway). `campaign.json` says which jobs ran, how long, and which failed: one failing job never
stops the others.

Recipe format (placeholders: `{run}` the job's run folder, `{checkpoint}` the job's checkpoint, `{data}`
the shared data root). A job's `checkpoint` is "best" (best.pt, the best validation figure; the default)
or "last" (last.pt: where a handful of validation images cannot choose an epoch, as for pneumothorax):

    minutes = 9            # each training's --max-minutes
    [[job]]
    name = "lung384"
    train = ["lung", "--init", "lung", "--input-size", "384", "--workers", "4"]
    evaluate = [["evaluate", "lung", "--checkpoint", "{checkpoint}", "--split", "{run}/split.json"]]
    checkpoint = "best"
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.processes import run_processes
from workers.models import fp16_state

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # also what the device machine hands back
#: Options the campaign sets itself for every job (its folders and its budget).
OWNED = {"--run", "--max-minutes", "--out"}
CHECKPOINTS = ("best", "last")
#: What of a checkpoint travels in its fp16 copy (not last.pt's optimizer and scaler state).
FP16_KEYS = ("model", "spec", "epoch", "metrics", "state")


@dataclass(frozen=True)
class Job:
    name: str
    train: list[str]  # `python -m training train` arguments, task first
    evaluate: list[list[str]]  # `python -m training` commands (evaluate/calibrate ...), scored after
    checkpoint: str = "best"  # which of the run's checkpoints is evaluated and copied in fp16


@dataclass(frozen=True)
class Recipe:
    minutes: float
    jobs: list[Job]


def load_recipe(path: Path) -> Recipe:
    """A recipe file, checked before anything starts (a lent machine's minutes are not for typos)."""
    data = tomllib.loads(path.read_text())
    minutes = float(data.get("minutes", 0))
    if minutes <= 0:
        raise ValueError(f"{path}: `minutes` (each training's budget) must be > 0")
    jobs = []
    for raw in data.get("job", []):
        name = str(raw.get("name", ""))
        if not NAME.match(name):
            raise ValueError(f"{path}: job name {name!r} must be letters, digits, '.', '_' or '-'")
        train = [str(a) for a in raw.get("train", [])]
        evaluate = [[str(a) for a in cmd] for cmd in raw.get("evaluate", [])]
        if not train:
            raise ValueError(f"{path}: job {name} has no `train` arguments")
        for args in [train, *evaluate]:
            owned = OWNED & {a.split("=")[0] for a in args}
            if owned:
                raise ValueError(f"{path}: job {name} sets {sorted(owned)}: the campaign sets these itself")
        if any(cmd[:1] not in (["evaluate"], ["calibrate"]) for cmd in evaluate):
            raise ValueError(f"{path}: job {name}: each `evaluate` entry starts with evaluate or calibrate")
        checkpoint = str(raw.get("checkpoint", "best"))
        if checkpoint not in CHECKPOINTS:
            raise ValueError(f"{path}: job {name}: checkpoint must be one of {CHECKPOINTS}, not {checkpoint!r}")
        jobs.append(Job(name, train, evaluate, checkpoint))
    names = [j.name for j in jobs]
    if not jobs or len(set(names)) != len(names):
        raise ValueError(f"{path}: needs at least one job and unique job names, got {names}")
    return Recipe(minutes, jobs)


def fill(args: list[str], run: Path, data_root: Path, checkpoint: str = "best") -> list[str]:
    """`args` with the recipe placeholders `{run}`, `{checkpoint}` and `{data}` filled in."""
    values = {"run": str(run), "checkpoint": str(run / f"{checkpoint}.pt"), "data": str(data_root)}
    return [a.format(**values) for a in args]


def _owned(run: Path, recipe: Recipe) -> list[str]:
    return ["--run", str(run), "--max-minutes", str(recipe.minutes)]


def fp16_name(checkpoint: str) -> str:
    """The file name of the fp16 copy of a run's `checkpoint` ("best" or "last")."""
    return f"{checkpoint}.fp16.pt"


def write_fp16(run: Path, checkpoint: str = "best") -> Path | None:
    """<checkpoint>.pt with fp16 tensors and without optimizer state: a checkpoint that `load_model`,
    `evaluate`, `calibrate` and `export` read as it is, at a quarter of last.pt's size."""
    source = run / f"{checkpoint}.pt"
    if not source.exists():
        return None
    ckpt = torch.load(source, map_location="cpu", weights_only=False)
    ckpt = {k: v for k, v in ckpt.items() if k in FP16_KEYS}
    ckpt["model"] = fp16_state(ckpt["model"])
    out = run / fp16_name(checkpoint)
    torch.save(ckpt, out)
    return out


def run_campaign(recipe: Recipe, out: Path, data_root: Path, parallel: int = 0) -> dict[str, Any]:
    """Train every job (all at once unless `parallel`), then evaluate; returns and writes campaign.json."""
    python = [sys.executable, "-m", "training"]
    started = time.monotonic()
    trainings = [
        (
            job.name,
            [*python, "train", *fill(job.train, out / job.name, data_root), *_owned(out / job.name, recipe)],
            out / job.name / "train.log",
        )
        for job in recipe.jobs
    ]
    train_codes = run_processes(trainings, parallel or len(trainings))
    train_s = time.monotonic() - started
    evaluations = []
    for job in recipe.jobs:
        run = out / job.name
        if train_codes[job.name] != 0 or not (run / f"{job.checkpoint}.pt").exists():
            continue
        for k, cmd in enumerate(job.evaluate):
            target = run / f"eval{k}"
            argv = [*python, *fill(cmd, run, data_root, job.checkpoint), "--out", str(target)]
            evaluations.append((f"{job.name}/eval{k}", argv, run / "evaluate.log"))
    eval_codes = run_processes(evaluations, parallel or len(recipe.jobs))
    jobs: dict[str, Any] = {}
    for job in recipe.jobs:
        run = out / job.name
        history = json.loads((run / "history.json").read_text()) if (run / "history.json").exists() else []
        evaluated = {}
        for k, cmd in enumerate(job.evaluate):
            summary = run / f"eval{k}" / "summary.json"
            evaluated[f"eval{k}"] = {
                "command": "python -m training " + " ".join(cmd),
                "exit": eval_codes.get(f"{job.name}/eval{k}"),
                "summary": str(summary.relative_to(out)) if summary.exists() else None,
            }
        fp16 = write_fp16(run, job.checkpoint)
        jobs[job.name] = {
            "train_exit": train_codes[job.name],
            "epochs": len(history),
            "best_val_select": max((h.get("val_select", float("-inf")) for h in history), default=None),
            "checkpoint_fp16": str(fp16.relative_to(out)) if fp16 else None,
            "evaluations": evaluated,
        }
    result = {
        "minutes_per_training": recipe.minutes,
        "train_wall_s": round(train_s, 1),
        "total_wall_s": round(time.monotonic() - started, 1),
        "cuda": torch.cuda.is_available(),
        "failed": sorted(
            [n for n, j in jobs.items() if j["train_exit"] != 0]
            + [f"{n}/{e}" for n, j in jobs.items() for e, v in j["evaluations"].items() if v["exit"] not in (0, None)]
        ),
        "jobs": jobs,
    }
    (out / "campaign.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
