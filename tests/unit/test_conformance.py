"""docs/conformance.md is what the code does: regenerated and compared, and spot-checked against the SCP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pynetdicom import AllStoragePresentationContexts

from node import conformance
from node.runtime.config import Settings, load_settings
from tests.support.paths import REPO_ROOT


def test_document_matches_the_code() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "node.conformance", "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_check_fails_when_the_document_drifts(tmp_path: Path) -> None:
    doc = tmp_path / "conformance.md"
    doc.write_text(conformance.DOC_PATH.read_text().replace("| Explicit VR Little Endian |", "| Explicit VR LE |"))
    assert conformance.main(["--check", "--output", str(doc)]) == 1
    assert conformance.main(["--output", str(doc)]) == 0
    assert conformance.main(["--check", "--output", str(doc)]) == 0


def test_scp_contexts_are_the_listeners() -> None:
    contexts = dict(conformance.scp_contexts(Settings()))
    assert "1.2.840.10008.1.1" in contexts  # Verification
    for cx in AllStoragePresentationContexts:
        assert str(cx.abstract_syntax) in contexts
    text = conformance.DOC_PATH.read_text()
    for uid in (
        "1.2.840.10008.5.1.4.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.5",
    ):
        assert f"`{uid}`" in text


def test_every_status_the_ingest_returns_is_described() -> None:
    statuses = dict(conformance.status_constants())
    assert {0x0000, 0xA700, 0xA900, 0xC000} <= set(statuses.values())
    text = conformance.render()
    for value in statuses.values():
        assert f"`0x{value:04X}`" in text


def test_config_values_flow_into_the_document() -> None:
    text = conformance.render(load_settings(None, dicom={"ae_title": "OTHERNODE", "max_associations": 3}))
    assert "`OTHERNODE`" in text and "more than 3 associations" in text
