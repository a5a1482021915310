"""Patient-level train/validation splits, deterministic and written next to the run.

A patient's bucket depends only on (seed, patient key), so the same image lands on the same side in
every task (the covid_opacity validation images of the lung and opacity runs are the same), and no
patient is ever on both sides. Folders without patient ids use the image id as the key (covid_opacity
is de-duplicated image by image; pneumothorax/ has no patient information).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from training.data import Sample


def bucket(patient: str, seed: int) -> float:
    """Uniform in [0, 1) from the patient key."""
    digest = hashlib.sha256(f"cxr-train-split-v1|{seed}|{patient}".encode()).hexdigest()
    return int(digest[:12], 16) / 16**12


def is_validation(sample: Sample, seed: int, val_fraction: float) -> bool:
    return bucket(sample.patient, seed) < val_fraction


def split(samples: Sequence[Sample], seed: int, val_fraction: float) -> tuple[list[Sample], list[Sample]]:
    train = [s for s in samples if not is_validation(s, seed, val_fraction)]
    val = [s for s in samples if is_validation(s, seed, val_fraction)]
    overlap = {s.patient for s in train} & {s.patient for s in val}
    assert not overlap, f"patients on both sides of the split: {sorted(overlap)[:5]}"
    return train, val


def write_split(
    path: Path,
    train: Sequence[Sample],
    val: Sequence[Sample],
    seed: int,
    val_fraction: float,
    weak_folds: dict[str, list[int]] | None = None,
) -> None:
    """`weak_folds`: the severity folds on each side (weak labels split by their `fold` column)."""

    def side(samples: Sequence[Sample]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for s in samples:
            out.setdefault(s.source, []).append(s.id)
        return out

    path.write_text(
        json.dumps(
            {
                "rule": "validation if sha256('cxr-train-split-v1|<seed>|<patient key>') < val_fraction "
                "(patient key = patient_id column, else '<folder>:<image id>')",
                "seed": seed,
                "val_fraction": val_fraction,
                **({"weak_folds": weak_folds} if weak_folds else {}),
                "train": side(train),
                "validation": side(val),
                "counts": {
                    "train": len(train),
                    "validation": len(val),
                    "train_patients": len({s.patient for s in train}),
                    "validation_patients": len({s.patient for s in val}),
                },
            },
            indent=1,
        )
        + "\n"
    )


def read_split(path: Path) -> dict[str, set[str]]:
    """{"train"|"validation": {"<source>/<id>", ...}}"""
    data = json.loads(path.read_text())
    return {k: {f"{src}/{i}" for src, ids in data[k].items() for i in ids} for k in ("train", "validation")}
