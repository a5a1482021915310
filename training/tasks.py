"""What each shipped model is trained on by default (folders relative to the shared data root)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def shared_data_root() -> Path:
    """$CXR_SHARED_DATA, else ../shared/data beside the repository root."""
    env = os.environ.get("CXR_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@dataclass(frozen=True)
class Task:
    name: str  # = ModelSpec.name
    structures: tuple[str, ...]
    data: tuple[str, ...]  # folders with masks of `structures`
    negatives: tuple[str, ...] = ()  # folders known to be free of `structures` (all-zero masks)
    negatives_per_source: int = 0  # 0 = all images of each negatives folder
    weak_data: tuple[str, ...] = ()  # severity-format folders for the weak zone loss (training.weak)
    notes: list[str] = field(default_factory=list)


TASKS: dict[str, Task] = {
    "lung": Task("lung", ("lungs",), ("lung/jsrt", "lung/darwin_covid", "covid_opacity")),
    # JSRT (normal lungs, no COVID) as negatives: the pixel masks alone taught the model to call
    # opacity in every lower zone. severity/ trains the zone rule itself through the weak loss.
    "opacity": Task("opacity", ("opacity",), ("covid_opacity",), negatives=("lung/jsrt",),
                    weak_data=("severity",)),
    # SIIM positives only in shared/: negatives from normal (JSRT) and COVID (Darwin) images, a few
    # of each so the model cannot tell "positive" from "SIIM-looking" alone as easily.
    "pneumothorax": Task("pneumothorax", ("pneumothorax",), ("pneumothorax",),
                         negatives=("lung/jsrt", "lung/darwin_covid", "covid_opacity"),
                         negatives_per_source=40),
}
