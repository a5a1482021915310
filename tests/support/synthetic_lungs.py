"""Chest-like training folders in the shared format, for tests that train: a bright body with two
dark 'lungs' (the mask), two images per patient."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image


def ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.ogrid[: shape[0], : shape[1]]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def lung_folder(root: Path, n: int = 8, shape: tuple[int, int] = (80, 72)) -> Path:
    """`root` with index.csv, images/ and masks/lungs/ of `n` synthetic chests."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "masks" / "lungs").mkdir(parents=True)
    rows = []
    h, w = shape
    for i in range(n):
        lungs = ellipse(shape, h * 0.5 + rng.uniform(-4, 4), w * 0.3, h * 0.3, w * 0.13) | ellipse(
            shape, h * 0.5 + rng.uniform(-4, 4), w * 0.7, h * 0.3, w * 0.13
        )
        image = np.where(lungs, 60, 190) + rng.normal(0, 12, shape)
        sid = f"img{i}"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"{sid}.png")
        Image.fromarray(lungs.astype(np.uint8) * 255).save(root / "masks" / "lungs" / f"{sid}.png")
        rows.append({"id": sid, "patient_id": f"p{i // 2}", "image_path": f"images/{sid}.png"})
    with open(root / "index.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root
