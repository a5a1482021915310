"""Whole-image prediction exactly as the worker runs it, back on the image's own pixel grid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers import tta
from workers.backends import Prediction
from workers.inference import resize_prob
from workers.models import ModelSpec, build, load, preprocess


@torch.no_grad()
def _forward(model: torch.nn.Module, x: np.ndarray) -> Prediction:
    out = model(torch.from_numpy(x))
    presence = None
    if isinstance(out, tuple):  # smp aux head: (mask logits, class logits)
        out, cls = out
        presence = torch.sigmoid(cls).reshape(-1).numpy()
    return Prediction(mask=torch.sigmoid(out).numpy(), presence=presence)


def predict(
    model: torch.nn.Module, spec: ModelSpec, image: np.ndarray, transforms: Sequence[tta.Transform] = ()
) -> tuple[np.ndarray, float | None]:
    """(probability maps CxHxW at the image's size, presence probability or None).

    The network sees `workers.models.preprocess(image, spec.input_size)` (through the worker's
    `workers.tta` when transforms are given); its probabilities are resized back with the worker's
    `resize_prob` before anything is thresholded.
    """
    pred = tta.predict(lambda x: _forward(model, x), preprocess(image, spec.input_size), transforms)
    presence = None if pred.presence is None else float(pred.presence[0])
    return np.stack([resize_prob(ch, *image.shape) for ch in pred.mask[0]]), presence


def load_model(
    name: str, weights_dir: Path | None = None, checkpoint: Path | None = None
) -> tuple[torch.nn.Module, ModelSpec, dict[str, Any]]:
    """A model from a training checkpoint (best.pt/last.pt) or from exported weights + card."""
    if checkpoint is not None:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
        spec = ModelSpec(**ckpt["spec"])
        model = build(spec)
        model.load_state_dict(ckpt["model"])
        model.eval()
        return model, spec, {}
    model, card = load(name, weights_dir) if weights_dir else load(name)
    return model, ModelSpec(**card["spec"]), card


@dataclass(frozen=True)
class Segmenter:
    """A loaded model, its spec and the pixel threshold its card ships (or one given)."""

    model: torch.nn.Module
    spec: ModelSpec
    threshold: float
    transforms: tuple[tta.Transform, ...] = ()

    @classmethod
    def load(
        cls,
        name: str,
        weights_dir: Path | None = None,
        checkpoint: Path | None = None,
        threshold: float | None = None,
        tta_names: Sequence[str] | None = None,
    ) -> Segmenter:
        """A shipped model runs with its card's threshold and TTA (a checkpoint: 0.5, none) unless given."""
        model, spec, card = load_model(name, weights_dir, checkpoint)
        thr = threshold if threshold is not None else float(card.get("threshold", 0.5))
        return cls(model, spec, thr, tuple(tta.card_transforms(card, tta_names)))

    def prob(self, image: np.ndarray) -> np.ndarray:
        """Probability map of the first channel, on the image's grid."""
        prob: np.ndarray = predict(self.model, self.spec, image, self.transforms)[0][0]
        return prob

    def mask(self, image: np.ndarray) -> np.ndarray:
        return self.prob(image) > self.threshold
