"""Where the shared test data lives: the `shared` folder beside the repository root (CI clones the
repository elsewhere with shared/ beside it)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Overrides the data root where shared/ cannot sit beside the checkout (e.g. a lent GPU machine).
ENV_SHARED_DATA = "CXR_SHARED_DATA"


def shared_data() -> Path:
    """`<repo>/../shared/data`, or $CXR_SHARED_DATA when set."""
    env = os.environ.get(ENV_SHARED_DATA)
    return Path(env).resolve() if env else (REPO_ROOT / ".." / "shared" / "data").resolve()


def dicom_dir() -> Path:
    """The DICOM test-file set (`manifest.csv` says what each file must get)."""
    return shared_data() / "dicom"


def dicom_manifest() -> list[dict[str, str]]:
    """Rows of `dicom/manifest.csv`, in file order."""
    import csv

    with open(dicom_dir() / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))
