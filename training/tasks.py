"""What each shipped model is trained on by default (folders relative to the shared data root)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def shared_data_root() -> Path:
    """$CXR_SHARED_DATA, else ../shared/data beside the repository root."""
    env = os.environ.get("CXR_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def portable(value: Any) -> Any:
    """`value` (a string, or lists and dicts of them) with the shared data root written as
    `../shared/data` (relative to the repository root; `$CXR_SHARED_DATA` when that is set), so model
    cards and summaries name no machine's paths."""
    if isinstance(value, str):
        name = "$CXR_SHARED_DATA" if os.environ.get("CXR_SHARED_DATA") else "../shared/data"
        return value.replace(str(shared_data_root()), name)
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    return value


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
    "opacity": Task("opacity", ("opacity",), ("covid_opacity",), negatives=("lung/jsrt",), weak_data=("severity",)),
    # SIIM positives only in shared/: negatives from normal (JSRT) and COVID (Darwin) images, a few
    # of each so the model cannot tell "positive" from "SIIM-looking" alone as easily.
    "pneumothorax": Task(
        "pneumothorax",
        ("pneumothorax",),
        ("pneumothorax",),
        negatives=("lung/jsrt", "lung/darwin_covid", "covid_opacity"),
        negatives_per_source=40,
    ),
}
