"""Which model weights a benchmark runs: the shipped ones, or stand-ins with a clear label.

- ``shipped``: `workers/weights/` (what `make run` uses).
- ``random``: the shipped architectures at their shipped input size (from the cards), randomly initialised: the same
  speed as trained weights (the numbers they produce mean nothing).
- ``tiny``: the same architectures at 64x64 (smoke runs only).
- ``auto``: shipped when all three models are there, else random.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from workers import models
from workers.api import MODEL_NAMES

log = logging.getLogger(__name__)

TINY_SIZE = 64


def shipped_present(weights_dir: Path = models.WEIGHTS_DIR) -> bool:
    return all(
        models.card_path(n, weights_dir).exists() and models.weights_path(n, weights_dir).exists() for n in MODEL_NAMES
    )


def shipped_spec(name: str) -> models.ModelSpec:
    """The architecture and input size of the shipped model (its card, which travels without the
    weights), else the default spec."""
    card = models.card_path(name)
    return models.spec_from_card(json.loads(card.read_text())) if card.exists() else models.SPECS[name]


def resolve(mode: str, cache: Path) -> tuple[str, Path]:
    """(label, folder) for `mode`; stand-ins are written once into `cache`."""
    if mode == "auto":
        mode = "shipped" if shipped_present() else "random"
    if mode == "shipped":
        if not shipped_present():
            raise FileNotFoundError(f"shipped weights are not (all) in {models.WEIGHTS_DIR}")
        return "shipped", models.WEIGHTS_DIR
    if mode not in ("random", "tiny"):
        raise ValueError(f"unknown weights mode {mode!r}")
    size = TINY_SIZE if mode == "tiny" else None
    specs = {n: dataclasses.replace(shipped_spec(n), input_size=size) if size else shipped_spec(n) for n in MODEL_NAMES}
    key = json.dumps({n: dataclasses.asdict(s) for n, s in specs.items()}, sort_keys=True)
    folder = cache / f"weights-{mode}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if not shipped_present(folder):
        _write(folder, specs, mode)
    return mode, folder


def _write(folder: Path, specs: dict[str, models.ModelSpec], mode: str) -> None:
    import torch

    torch.manual_seed(0)
    for spec in specs.values():
        module = models.build(spec).eval()
        card: dict[str, Any] = {
            "version": f"benchmark-{mode}",
            "status": "experimental",
            "training_data": "none: random initialisation for benchmarks",
        }
        models.save(module, spec, card, folder)
    log.info("wrote %s stand-in weights to %s", mode, folder)
