"""Augmentation for chest radiographs (albumentations).

No left-right flip: the patient's right lung is on the image left, and the severity zones and the
pneumothorax side depend on it.
"""

from __future__ import annotations

import albumentations as A
import cv2


def radiograph_augment(strength: float = 1.0, seed: int | None = None) -> A.Compose:
    """Small geometric changes (positioning), exposure changes (kV/mAs, processing), mild elastic.
    `seed` fixes the draws (tests); albumentations keeps its own generator, apart from numpy's and torch's."""
    s = strength
    return A.Compose(
        [
            A.Affine(
                scale=(1 - 0.1 * s, 1 + 0.1 * s),
                translate_percent=(-0.05 * s, 0.05 * s),
                rotate=(-10 * s, 10 * s),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=0.8,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.15 * s, contrast_limit=0.15 * s, p=0.5),
            A.RandomGamma(gamma_limit=(80, 120), p=0.3),
            A.CLAHE(clip_limit=2.0, p=0.2),
            A.ElasticTransform(alpha=10 * s, sigma=8, p=0.15),
        ],
        seed=seed,
    )
