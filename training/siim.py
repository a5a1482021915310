"""Convert the full SIIM-ACR 2019 set (train-rle.csv + images) into the shared folder format, so that
`python -m training train pneumothorax --data <out> --negatives` trains on it directly (its own
"-1" rows are the negatives).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from training.rle import SIIM_SIZE, read_csv

log = logging.getLogger(__name__)

LONG_SIDE = 512  # like every shared folder


def _read_image(path: Path) -> tuple[np.ndarray, str]:
    """(uint8 image, patient id or "") — SIIM DICOMs carry a PatientID, usable for patient-level splits."""
    if path.suffix.lower() == ".dcm":
        import pydicom

        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(np.float32)
        lo, hi = float(pixels.min()), float(pixels.max())
        scaled = (pixels - lo) / (hi - lo or 1.0) * 255.0
        if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
            scaled = 255.0 - scaled
        return scaled.astype(np.uint8), str(getattr(ds, "PatientID", "") or "")
    return np.asarray(Image.open(path).convert("L")), ""


def _find_images(images: Path) -> dict[str, Path]:
    found = {}
    for p in images.rglob("*"):
        if p.suffix.lower() in (".dcm", ".png", ".jpg", ".jpeg"):
            found[p.stem] = p
    return found


def import_siim(rle_csv: Path, images: Path, out: Path, limit: int = 0) -> int:
    """Write out/index.csv, out/images/<ImageId>.png, out/masks/pneumothorax/<ImageId>.png; returns count."""
    masks = read_csv(rle_csv, SIIM_SIZE)
    paths = _find_images(images)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks" / "pneumothorax").mkdir(parents=True, exist_ok=True)
    rows = []
    for image_id, mask in masks.items():
        if image_id not in paths:
            log.warning("%s: no image file for ImageId %s", rle_csv, image_id)
            continue
        image, patient = _read_image(paths[image_id])
        if mask.shape != image.shape:
            raise ValueError(f"{image_id}: image {image.shape} vs RLE grid {mask.shape}")
        h, w = image.shape
        scale = LONG_SIDE / max(h, w)
        size = (round(w * scale), round(h * scale))
        small = Image.fromarray(image).resize(size, Image.Resampling.LANCZOS)
        small_mask = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
        small.save(out / "images" / f"{image_id}.png")
        small_mask.save(out / "masks" / "pneumothorax" / f"{image_id}.png")
        m = np.asarray(small_mask) > 127
        rows.append(
            {
                "id": image_id,
                "width_orig": w,
                "height_orig": h,
                "width": size[0],
                "height": size[1],
                "has_pneumothorax": int(m.any()),
                "mask_fraction": round(float(m.mean()), 6),
                "patient_id": f"siim:{patient}" if patient else "",
                "image_path": f"images/{image_id}.png",
            }
        )
        if limit and len(rows) >= limit:
            break
    with open(out / "index.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["id"])
        w.writeheader()
        w.writerows(rows)
    log.info("wrote %d images to %s", len(rows), out)
    return len(rows)
