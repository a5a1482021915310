"""Whole-image prediction exactly as the worker runs it, back on the image's own pixel grid."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.inference import resize_prob
from workers.models import ModelSpec, build, load, preprocess


@torch.no_grad()
def predict(model: torch.nn.Module, spec: ModelSpec, image: np.ndarray) -> tuple[np.ndarray, float | None]:
    """(probability maps CxHxW at the image's size, presence probability or None).

    The network sees `workers.models.preprocess(image, spec.input_size)`; its probabilities are
    resized back with the worker's `resize_prob` before anything is thresholded.
    """
    x = torch.from_numpy(preprocess(image, spec.input_size))
    out = model(x)
    presence = None
    if isinstance(out, tuple):  # smp aux head: (mask logits, class logits)
        out, cls = out
        presence = float(torch.sigmoid(cls).reshape(-1)[0])
    prob = torch.sigmoid(out)[0].numpy()
    return np.stack([resize_prob(ch, *image.shape) for ch in prob]), presence


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

    @classmethod
    def load(
        cls, name: str, weights_dir: Path | None = None, checkpoint: Path | None = None, threshold: float | None = None
    ) -> Segmenter:
        model, spec, card = load_model(name, weights_dir, checkpoint)
        return cls(model, spec, threshold if threshold is not None else float(card.get("threshold", 0.5)))

    def prob(self, image: np.ndarray) -> np.ndarray:
        """Probability map of the first channel, on the image's grid."""
        prob: np.ndarray = predict(self.model, self.spec, image)[0][0]
        return prob

    def mask(self, image: np.ndarray) -> np.ndarray:
        return self.prob(image) > self.threshold
