"""Architecture specs, shared preprocessing, and weight loading: one definition for training and inference.

Weights ship as `workers/weights/<name>.safetensors` (fp16) beside `<name>.json` (the model card,
whose `sha256` must match the weights file).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workers.catalogue import SHIPPED_WEIGHTS_DIR

log = logging.getLogger(__name__)

WEIGHTS_DIR = SHIPPED_WEIGHTS_DIR  # the catalogue says where weights live


@dataclass(frozen=True)
class ModelSpec:
    name: str  # "lung" | "opacity" | "pneumothorax"
    arch: str  # smp class name, e.g. "Unet", "DeepLabV3Plus", "MAnet"
    encoder: str  # smp encoder name
    input_size: int  # square side the network sees
    in_channels: int = 1
    classes: int = 1
    aux_classification: bool = False  # pneumothorax presence head (smp aux_params)


# What the shipped weights are trained with (the card records the spec of each weights file).
# DeepLabV3+ resnet18: ~205 ms per image per training step at 256² on 2 CPU cores (U-Net resnet18:
# ~350 ms) and 25 MB in fp16, so all three models fit the 80 MB weight budget (3 U-Net r18: 87 MB).
# Lung and opacity train at 160² because the shared 2-core machine gave training ~10% of a core
# each: 2.6x more steps in the same time mattered more than resolution (retrain at 256-512 on a GPU).
SPECS: dict[str, ModelSpec] = {
    "lung": ModelSpec("lung", "DeepLabV3Plus", "resnet18", 160),
    "opacity": ModelSpec("opacity", "DeepLabV3Plus", "resnet18", 160),
    "pneumothorax": ModelSpec("pneumothorax", "DeepLabV3Plus", "resnet18", 256, aux_classification=True),
}


class WeightsError(RuntimeError):
    """Shipped weights are missing, corrupt, or do not match their model card."""


def build(spec: ModelSpec) -> Any:
    """An untrained torch module for `spec` (never downloads: encoder_weights=None)."""
    import segmentation_models_pytorch as smp

    cls = getattr(smp, spec.arch)
    kwargs: dict[str, Any] = dict(
        encoder_name=spec.encoder, encoder_weights=None, in_channels=spec.in_channels, classes=spec.classes
    )
    if spec.aux_classification:
        kwargs["aux_params"] = {"classes": 1, "dropout": 0.2}
    return cls(**kwargs)


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxW -> float32 1x1xSxS, the exact transform used in training and by the worker."""
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected 2-D uint8, got {image.dtype} {image.shape}")
    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
    x = (resized.astype(np.float32) / 255.0 - 0.5) / 0.25
    return x[None, None]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_path(name: str, weights_dir: Path = WEIGHTS_DIR) -> Path:
    return weights_dir / f"{name}.json"


def weights_path(name: str, weights_dir: Path = WEIGHTS_DIR) -> Path:
    return weights_dir / f"{name}.safetensors"


def read_card(name: str, weights_dir: Path = WEIGHTS_DIR) -> dict[str, Any]:
    path = card_path(name, weights_dir)
    if not path.exists():
        raise WeightsError(f"model card {path} is missing (train and export the {name!r} model)")
    card: dict[str, Any] = json.loads(path.read_text())
    return card


def spec_from_card(card: dict[str, Any]) -> ModelSpec:
    fields = ModelSpec.__dataclass_fields__
    return ModelSpec(**{k: v for k, v in card["spec"].items() if k in fields})


def load(name: str, weights_dir: Path = WEIGHTS_DIR) -> tuple[Any, dict[str, Any]]:
    """(torch module in eval mode, float32, on CPU; card). Checks the sha256 in the card."""
    from safetensors.torch import load_file

    card = read_card(name, weights_dir)
    wpath = weights_path(name, weights_dir)
    if not wpath.exists():
        raise WeightsError(f"weights {wpath} are missing")
    digest = sha256_file(wpath)
    if digest != card.get("sha256"):
        raise WeightsError(f"{wpath}: sha256 {digest[:12]}… does not match its card ({str(card.get('sha256'))[:12]}…)")
    spec = spec_from_card(card)
    model = build(spec)
    state = {k: v.float() for k, v in load_file(str(wpath)).items()}
    model.load_state_dict(state)
    model.eval()
    return model, card


def fp16_state(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict as the weights ship: floating tensors in fp16, all contiguous on the CPU."""
    return {
        k: v.detach().cpu().half().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
        for k, v in state.items()
    }


def save(model: Any, spec: ModelSpec, card: dict[str, Any], weights_dir: Path = WEIGHTS_DIR) -> Path:
    """Write fp16 safetensors + card (sha256 filled in). Returns the weights path."""
    from safetensors.torch import save_file

    weights_dir.mkdir(parents=True, exist_ok=True)
    wpath = weights_path(spec.name, weights_dir)
    save_file(fp16_state(model.state_dict()), str(wpath))
    full = dict(card)
    full["name"] = spec.name
    full["spec"] = asdict(spec)
    full["sha256"] = sha256_file(wpath)
    full["size_bytes"] = wpath.stat().st_size
    card_path(spec.name, weights_dir).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    log.info("saved %s (%d bytes)", wpath, full["size_bytes"])
    return wpath
