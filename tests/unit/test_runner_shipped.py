"""The SHIPPED weights (workers/weights/) through the CPU worker's ONNX path equal torch on real images.

Runs for every model whose card is shipped; the tiny-model tests cover the code when none is yet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.paths import shared_data
from workers import models
from workers.api import MODEL_NAMES
from workers.backends import ONNX_TOLERANCE, max_abs_diff
from workers.runner import ModelRunner, default_weights_dir

# workers/weights, or $CXRNODE_WEIGHTS_DIR (to check a candidate set before it is shipped).
SHIPPED = [n for n in MODEL_NAMES if models.card_path(n, default_weights_dir()).exists()]


def chest_images(n: int = 2) -> list[np.ndarray]:
    folder = shared_data() / "lung" / "jsrt" / "images"
    return [np.asarray(Image.open(p).convert("L")) for p in sorted(folder.glob("*.png"))[:n]]


@pytest.mark.skipif(not SHIPPED, reason="no model shipped in workers/weights yet")
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_onnx_equals_torch(name: str, tmp_path: Path) -> None:
    onnx = ModelRunner(model_names=[name], device="cpu", backend="onnx", cache_dir=tmp_path)
    eager = ModelRunner(model_names=[name], device="cpu", backend="torch", cache_dir=tmp_path)
    assert onnx.backend_name(name) == "onnx-cpu"
    size = onnx.spec(name).input_size
    x = np.concatenate([models.preprocess(img, size) for img in chest_images()])
    assert max_abs_diff(onnx.predict(name, x), eager.predict(name, x)) < ONNX_TOLERANCE


@pytest.mark.skipif(not SHIPPED, reason="no model shipped in workers/weights yet")
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_experimental_models_say_how_weak_they_are(name: str) -> None:
    # The SR carries the card's `sr_performance` next to the numbers (Algorithm Parameters): an export
    # that drops it must be noticed, since a weak model has to say so where it is read.
    import json

    card = json.loads(models.card_path(name, default_weights_dir()).read_text())
    if card.get("status", "experimental") != "validated":
        assert 40 < len(card.get("sr_performance", "")) < 300, card.get("sr_performance")
