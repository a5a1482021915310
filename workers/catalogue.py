"""The model catalogue: which models exist, what their masks are called and drawn in, where their weights
and cards are. Torch-free, so the node reads it as it reads workers.api.

Model names used to be spelled in the node's configuration, the message contract and the pipeline,
segment colours in three tables (SEG, overlay, console) that had drifted apart, and the console found
the weights by locating the package while the worker honoured $CXRNODE_WEIGHTS_DIR. Each of these is
now defined here once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Models a rule may ask for, in the order the worker runs them.
MODEL_NAMES: tuple[str, ...] = ("lung", "opacity", "pneumothorax")

#: Where `<name>.safetensors` + `<name>.json` live: this variable, else the weights shipped in the package.
WEIGHTS_ENV = "CXRNODE_WEIGHTS_DIR"
SHIPPED_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class MaskSpec:
    """One output mask: the SEG segment and every picture that draws it."""

    name: str  # key in AnalyzeResult masks
    model: str  # the model that produces it
    label: str  # SEG Segment Label, console legend
    short_label: str  # the overlay's legend
    rgb: tuple[int, int, int]  # sRGB, 0-255

    @property
    def cielab(self) -> tuple[float, float, float]:
        """The colour as DICOM wants it for a SEG's Recommended Display CIELab Value (L*, a*, b*)."""
        return srgb_to_cielab(self.rgb)


#: Mask names in an AnalyzeResult, in SEG segment order.
MASKS: tuple[MaskSpec, ...] = (
    MaskSpec("right_lung", "lung", "Right lung", "R lung", (46, 134, 222)),
    MaskSpec("left_lung", "lung", "Left lung", "L lung", (16, 172, 132)),
    MaskSpec("opacity", "opacity", "COVID-19 opacity", "opacity", (255, 159, 67)),
    MaskSpec("pneumothorax", "pneumothorax", "Pneumothorax", "pneumothorax", (238, 82, 83)),
)
MASK_NAMES: tuple[str, ...] = tuple(m.name for m in MASKS)
MASK_BY_NAME: dict[str, MaskSpec] = {m.name: m for m in MASKS}


def weights_dir() -> Path:
    """The weights folder every process uses (worker, console, tests): $CXRNODE_WEIGHTS_DIR or shipped."""
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env) if env else SHIPPED_WEIGHTS_DIR


def model_cards(folder: Path | None = None) -> list[dict[str, Any]]:
    """The JSON model cards beside the weights, in name order; an unreadable card is reported in its
    `error` field, not raised (the console lists what it can)."""
    cards = []
    for path in sorted((folder or weights_dir()).glob("*.json")):
        try:
            card = json.loads(path.read_text())
            if not isinstance(card, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            card = {"name": path.stem, "error": f"unreadable card: {e}"}
        card.setdefault("name", path.stem)
        weights = path.with_suffix(".safetensors")
        card["_file"] = path.name
        card["_weights_present"] = weights.exists()
        card["_weights_mb"] = round(weights.stat().st_size / 1e6, 1) if weights.exists() else None
        cards.append(card)
    return cards


def srgb_to_cielab(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """sRGB (D65) to CIE L*a*b*, the conversion PS3.3 C.10.7.1.1 asks for display colours."""

    def linear(c: float) -> float:
        c /= 255.0
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgb)
    x = (0.4124 * r + 0.3576 * g + 0.1805 * b) / 0.95047
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    z = (0.0193 * r + 0.1192 * g + 0.9505 * b) / 1.08883

    def f(t: float) -> float:
        return t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29

    fx, fy, fz = f(x), f(y), f(z)
    return round(116 * fy - 16, 1), round(500 * (fx - fy), 1), round(200 * (fy - fz), 1)
