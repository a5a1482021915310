"""BCE + soft Dice over the valid pixels (masks/ignore excluded), the seeds' segmentation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bce_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, dice_weight: float = 1.0, eps: float = 1.0
) -> torch.Tensor:
    """Mean BCE over valid pixels + (1 - soft Dice) per image and channel, averaged."""
    valid = valid.expand_as(target)
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=valid, reduction="sum")
    bce = bce / valid.sum().clamp_min(1.0)
    prob = torch.sigmoid(logits) * valid
    tgt = target * valid
    dims = (2, 3)
    inter = (prob * tgt).sum(dims)
    dice = (2 * inter + eps) / (prob.sum(dims) + tgt.sum(dims) + eps)
    return bce + dice_weight * (1 - dice).mean()
