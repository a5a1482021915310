"""Whole-image prediction through the worker's preprocessing, back on the image's own pixel grid."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from workers.models import ModelSpec, preprocess


@torch.no_grad()
def predict(model: torch.nn.Module, spec: ModelSpec, image: np.ndarray) -> tuple[np.ndarray, float | None]:
    """(probability map CxHxW at the image's size, presence probability or None).

    The network sees `workers.models.preprocess(image, spec.input_size)`; its probabilities are
    resized bilinearly to the image size before thresholding, as the worker does.
    """
    x = torch.from_numpy(preprocess(image, spec.input_size))
    out = model(x)
    presence = None
    if isinstance(out, tuple):  # smp aux head: (mask logits, class logits)
        out, cls = out
        presence = float(torch.sigmoid(cls).reshape(-1)[0])
    prob = torch.sigmoid(out)
    prob = F.interpolate(prob, size=image.shape, mode="bilinear", align_corners=False)
    return prob[0].numpy(), presence
