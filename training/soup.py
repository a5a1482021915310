"""Weight averaging ("model soup") of checkpoints that share one architecture.

A fine-tune from the shipped weights often trades sources against each other (v3 lung: Darwin up,
JSRT and COVID-QU-Ex down). Two networks fine-tuned from the same start usually stay in one basin,
so a weighted mean of their parameters lands between their behaviours at no inference cost: the
result is still one network of the same size. Only floating-point tensors are averaged (weights and
BatchNorm running statistics); integer ones (`num_batches_tracked`) come from the first ingredient.

An ingredient is a training checkpoint (`best.pt`/`last.pt`) or `shipped` (the exported fp16
weights of the task, up-cast to fp32). The soup is written in the checkpoint format, so `evaluate`,
`calibrate` and `export` take it like any other `best.pt`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from training.predict import load_model

log = logging.getLogger(__name__)

SHIPPED = "shipped"


class SoupError(ValueError):
    """The ingredients cannot be averaged (different specs or parameters, bad weights)."""


def average_state_dicts(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, Any]:
    """sum_i w_i x state_i for floating tensors (weights normalised to sum 1); others from the first."""
    if len(states) != len(weights) or not states:
        raise SoupError(f"{len(states)} ingredients but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise SoupError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    keys = list(states[0])
    for i, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            raise SoupError(f"ingredient {i} has other parameters than ingredient 0")
    total = float(sum(weights))
    out: dict[str, Any] = {}
    for key in keys:
        first = states[0][key]
        if any(s[key].shape != first.shape for s in states):
            raise SoupError(f"{key}: shapes differ between ingredients")
        if not torch.is_floating_point(first):
            out[key] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float32)
        for state, w in zip(states, weights, strict=True):
            acc += state[key].to(torch.float32) * (w / total)
        out[key] = acc
    return out


def make_soup(
    task: str, ingredients: Sequence[str], weights: Sequence[float], out: Path, weights_dir: Path | None = None
) -> Path:
    """Average `ingredients` (checkpoint paths or "shipped") of `task` into checkpoint `out`."""
    states: list[Mapping[str, torch.Tensor]] = []
    specs = []
    for item in ingredients:
        checkpoint = None if item == SHIPPED else Path(item)
        model, spec, _ = load_model(task, weights_dir, checkpoint)
        states.append(model.state_dict())  # average_state_dicts sums in fp32 whatever the dtype
        specs.append(spec)
    if any(s != specs[0] for s in specs):
        raise SoupError(f"ingredients have different specs: {[asdict(s) for s in specs]}")
    state = average_state_dicts(states, weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe = {"ingredients": list(ingredients), "weights": [float(w) for w in weights]}
    tmp = out.with_suffix(out.suffix + ".tmp")
    torch.save({"model": state, "spec": asdict(specs[0]), "epoch": None, "metrics": {}, "soup": recipe}, tmp)
    tmp.replace(out)
    log.info("soup of %s (weights %s) -> %s", list(ingredients), list(weights), out)
    return out
