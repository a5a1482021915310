"""Where the shared test data lives: the `shared` folder beside the repository root (CI clones the
repository elsewhere with shared/ beside it)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data() -> Path:
    """`<repo>/../shared/data`."""
    return (REPO_ROOT / ".." / "shared" / "data").resolve()


def dicom_dir() -> Path:
    """The DICOM test-file set (`manifest.csv` says what each file must get)."""
    return shared_data() / "dicom"


def dicom_manifest() -> list[dict[str, str]]:
    """Rows of `dicom/manifest.csv`, in file order."""
    import csv

    with open(dicom_dir() / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))
