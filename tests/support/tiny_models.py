"""Tiny randomly initialised models of the shipped architectures, saved like shipped weights.

Same `workers.models.SPECS` architectures at a small input size, so tests exercise the real loading,
sha256 check, ONNX export and inference code in seconds. `head_logits` pins a model's output to a
constant (zero weights, fixed bias in the last layer) so a test knows the exact answer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from workers import models

TINY_SIZE = 64


def set_constant_head(module: Any, mask_logit: float, presence_logit: float | None = None) -> None:
    """Make the segmentation head output `mask_logit` everywhere (and the aux head `presence_logit`)."""
    with torch.no_grad():
        conv = module.segmentation_head[0]
        conv.weight.zero_()
        conv.bias.fill_(mask_logit)
        if presence_logit is not None:
            linear = [m for m in module.classification_head.modules() if isinstance(m, torch.nn.Linear)][-1]
            linear.weight.zero_()
            linear.bias.fill_(presence_logit)


def write_tiny_weights(
    weights_dir: Path,
    names: tuple[str, ...] = ("lung", "opacity", "pneumothorax"),
    size: int = TINY_SIZE,
    seed: int = 0,
    cards: dict[str, dict[str, Any]] | None = None,
    head_logits: dict[str, tuple[float, float | None]] | None = None,
) -> Path:
    """Save tiny models + cards into `weights_dir` via `workers.models.save`; returns the folder."""
    torch.manual_seed(seed)
    for name in names:
        spec = dataclasses.replace(models.SPECS[name], input_size=size)
        module = models.build(spec).eval()
        if head_logits and name in head_logits:
            set_constant_head(module, *head_logits[name])
        card: dict[str, Any] = {
            "version": f"tiny-{seed}",
            "status": "experimental",
            "training_data": "none (random initialisation for tests)",
        }
        card.update((cards or {}).get(name, {}))
        models.save(module, spec, card, weights_dir)
    return weights_dir
