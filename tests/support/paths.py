"""Where the shared test data lives: the `shared` folder beside the repository root (CI clones the
repository elsewhere with shared/ beside it)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data() -> Path:
    """`<repo>/../shared/data`."""
    return (REPO_ROOT / ".." / "shared" / "data").resolve()
