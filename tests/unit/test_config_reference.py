"""The README's configuration reference is generated from the configuration model and cannot drift."""

from __future__ import annotations

import pytest

from node.runtime import config_reference


def test_every_key_has_a_meaning_and_every_meaning_a_key() -> None:
    assert config_reference.problems() == []


def test_readme_table_is_what_the_model_generates() -> None:
    assert config_reference.main(["--check"]) == 0, "run: python -m node.runtime.config_reference"


def test_a_new_key_without_a_meaning_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(config_reference.MEANING, "dicom.port")
    assert config_reference.problems() == ["no meaning for configuration key dicom.port (add it to MEANING)"]
