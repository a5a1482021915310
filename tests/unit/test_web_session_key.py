"""The console's session key file: generated once (0600), reused, provisioned by hand, refused when unusable."""

from __future__ import annotations

import logging
import multiprocessing
import stat
from pathlib import Path

import pytest

from node.runtime.config import load_settings
from node.web.auth import AuthConfigError
from node.web.session_key import key_path, load_or_create


def test_generated_once_private_and_reused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "new" / "dir" / "web-session.key"
    with caplog.at_level(logging.DEBUG):
        key = load_or_create(path)
    assert len(key) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create(path) == key
    assert [p.name for p in path.parent.iterdir()] == ["web-session.key"]  # no temporary file left
    assert key.decode() not in caplog.text and str(path) in caplog.text  # the path is logged, never the key


def test_default_path_is_in_the_data_dir_and_config_overrides_it(tmp_path: Path) -> None:
    assert key_path(load_settings(None, storage={"data_dir": str(tmp_path)})) == tmp_path / "web-session.key"
    chosen = tmp_path / "secrets" / "console.key"
    assert key_path(load_settings(None, web={"session_key_file": str(chosen)})) == chosen


def test_a_provisioned_key_is_used_as_is(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "provisioned.key"
    path.write_text("f" * 64 + "\n")
    path.chmod(0o644)
    assert load_or_create(path) == b"f" * 64
    assert "chmod 600" in caplog.text  # readable by others: warned about, not rewritten
    assert path.read_text() == "f" * 64 + "\n"


def test_a_short_key_stops_the_console(tmp_path: Path) -> None:
    path = tmp_path / "short.key"
    path.write_text("too-short\n")
    with pytest.raises(AuthConfigError, match="at least 32"):
        load_or_create(path)


def test_processes_starting_together_agree_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "web-session.key"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        keys = pool.map(load_or_create, [path] * 8)
    assert len(set(keys)) == 1 and keys[0] == path.read_bytes().strip()
