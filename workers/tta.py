"""Test-time augmentation: each image also goes through a few transformed copies, probabilities averaged.

Why only these transforms: a chest radiograph is not left-right symmetric (heart, zones, the side of
a pneumothorax are part of the answer), so no flips. What varies between hospitals is exposure and
framing, hence:

- `identity` (required: it is the one copy that sees every pixel),
- `gamma:G` — pixel intensities (0..1) raised to G, a brighter or darker exposure,
- `scale:F` — zoom about the centre by F (F > 1 crops the centre, F < 1 shrinks the image into a
  canvas padded with its edge pixels),
- `shift:DY:DX` — translation by a fraction of the input side (positive = down / right).

Every transform works on the network's own input grid (the batch `workers.models.preprocess` makes),
so the worker's backends and `training` share this one code path. Each copy's probabilities are
mapped back to the input grid; a pixel a copy never saw (outside a zoomed-in crop, the band a shift
uncovers) takes no part in that pixel's mean. Presence probabilities are averaged over all copies.

A model card opts in with `"tta": ["identity", "gamma:0.8", ...]`; the default is no augmentation.
Each copy costs one more forward pass per image: the card's `tta_evaluation` says what it bought.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from workers.backends import Prediction

#: preprocess: x = (pixel / 255 - 0.5) / 0.25; these undo and redo it for intensity transforms.
_MEAN, _STD = 0.5, 0.25


@dataclass(frozen=True)
class Transform:
    kind: str  # "identity" | "gamma" | "scale" | "shift"
    a: float = 1.0
    b: float = 0.0

    @property
    def name(self) -> str:
        if self.kind == "identity":
            return "identity"
        if self.kind == "shift":
            return f"shift:{self.a:g}:{self.b:g}"
        return f"{self.kind}:{self.a:g}"


def parse(names: Sequence[str]) -> list[Transform]:
    """Transforms from card/CLI names; raises ValueError for an unknown or out-of-range one."""
    out: list[Transform] = []
    for name in names:
        kind, _, rest = name.partition(":")
        args = rest.split(":") if rest else []
        try:
            values = [float(v) for v in args]
        except ValueError:
            raise ValueError(f"TTA transform {name!r}: arguments must be numbers") from None
        if kind == "identity" and not values:
            out.append(Transform("identity"))
        elif kind == "gamma" and len(values) == 1 and 0.2 <= values[0] <= 5:
            out.append(Transform("gamma", values[0]))
        elif kind == "scale" and len(values) == 1 and 0.5 <= values[0] <= 2:
            out.append(Transform("scale", values[0]))
        elif kind == "shift" and len(values) == 2 and all(abs(v) <= 0.25 for v in values):
            out.append(Transform("shift", values[0], values[1]))
        else:
            raise ValueError(
                f"TTA transform {name!r} not understood: use identity, gamma:G (0.2-5), scale:F (0.5-2) "
                "or shift:DY:DX (fractions of the side, |d| <= 0.25)"
            )
    if not out or out[0].kind != "identity":
        raise ValueError("TTA transforms must start with 'identity' (the copy that covers every pixel)")
    if len({t.name for t in out}) != len(out):
        raise ValueError(f"TTA transforms repeated: {list(names)}")
    return out


def card_transforms(card: Mapping[str, Any], override: Sequence[str] | None = None) -> list[Transform]:
    """The transforms a model runs with: `override` (e.g. a --tta option) or else the card's `tta`."""
    names = override if override is not None else card.get("tta", [])
    return parse(names) if names else []


def _resize(plane: np.ndarray, size: int) -> np.ndarray:
    im = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def _scaled_side(side: int, factor: float) -> int:
    """Side of the centre window a zoom by `factor` maps onto the whole grid (zoom in) or into (out)."""
    return max(1, round(side / factor)) if factor > 1 else max(1, round(side * factor))


def _centre(side: int, inner: int) -> slice:
    start = (side - inner) // 2
    return slice(start, start + inner)


def _shift_slices(side: int, d: int) -> tuple[slice, slice]:
    """(source, destination) slices that move content by d pixels along one axis."""
    if d >= 0:
        return slice(0, side - d), slice(d, side)
    return slice(-d, side), slice(0, side + d)


def forward_image(x: np.ndarray, t: Transform) -> np.ndarray:
    """The transformed copy of a preprocessed batch (N, C, S, S)."""
    if t.kind == "identity":
        return x
    if t.kind == "gamma":
        pixels = np.clip(x * _STD + _MEAN, 0.0, 1.0)
        return ((pixels**t.a - _MEAN) / _STD).astype(np.float32)
    side = x.shape[-1]
    out = np.empty_like(x)
    if t.kind == "scale":
        inner = _scaled_side(side, t.a)
        for i in np.ndindex(*x.shape[:2]):
            if t.a > 1:
                crop = x[i][_centre(side, inner), _centre(side, inner)]
                out[i] = _resize(crop, side)
            else:
                small = _resize(x[i], inner)
                before = (side - inner) // 2
                out[i] = np.pad(small, (before, side - inner - before), mode="edge")
        return out
    # shift: move the content, fill the uncovered band with the nearest edge row/column
    dy, dx = round(t.a * side), round(t.b * side)
    pad = np.pad(x, ((0, 0), (0, 0), (abs(dy), abs(dy)), (abs(dx), abs(dx))), mode="edge")
    rows = slice(abs(dy) - dy, abs(dy) - dy + side)
    cols = slice(abs(dx) - dx, abs(dx) - dx + side)
    out[:] = pad[..., rows, cols]
    return out


def inverse_mask(p: np.ndarray, t: Transform) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (N, C, S, S) of a transformed copy mapped back: (probabilities, weight S x S)."""
    side = p.shape[-1]
    weight = np.ones((side, side), np.float32)
    if t.kind in ("identity", "gamma"):
        return p, weight
    back = np.zeros_like(p)
    if t.kind == "scale":
        inner = _scaled_side(side, t.a)
        for i in np.ndindex(*p.shape[:2]):
            if t.a > 1:
                back[i][_centre(side, inner), _centre(side, inner)] = _resize(p[i], inner)
            else:
                back[i] = _resize(p[i][_centre(side, inner), _centre(side, inner)], side)
        if t.a > 1:
            weight[:] = 0
            weight[_centre(side, inner), _centre(side, inner)] = 1
        return back, weight
    dy, dx = round(t.a * side), round(t.b * side)
    (sy, ty), (sx, tx) = _shift_slices(side, dy), _shift_slices(side, dx)
    back[..., sy, sx] = p[..., ty, tx]
    weight[:] = 0
    weight[sy, sx] = 1
    return back, weight


def predict(forward: Callable[[np.ndarray], Prediction], x: np.ndarray, transforms: Sequence[Transform]) -> Prediction:
    """`forward(x)` averaged over `transforms` (one forward call per transform, each on the whole batch)."""
    if not transforms:
        return forward(x)
    total: np.ndarray | None = None
    weights: np.ndarray | None = None
    presences: list[np.ndarray] = []
    for t in transforms:
        pred = forward(forward_image(x, t))
        back, w = inverse_mask(pred.mask, t)
        total = back * w if total is None else total + back * w
        weights = w.copy() if weights is None else weights + w
        if pred.presence is not None:
            presences.append(pred.presence)
    assert total is not None and weights is not None
    mask = (total / np.maximum(weights, 1e-6)).astype(np.float32)
    presence = np.mean(presences, axis=0).astype(np.float32) if presences else None
    return Prediction(mask=mask, presence=presence)
