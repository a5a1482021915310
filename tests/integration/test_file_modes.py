"""Files the node writes are not readable by others, whatever umask it was started with, and its
settings reach its worker in a 0600 file, not in the environment (issue 13, finding 8)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from node.web.auth import hash_password
from tests.support.dcmtk import send_as_stored, storescu
from tests.support.net import wait_for
from tests.support.node import NodeProcess
from tests.support.paths import dicom_dir
from tests.support.synthetic_dicom import small_chest_copies

pytestmark = pytest.mark.timeout(120)


def children(pid: int) -> list[int]:
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat_file.parent.name))
    return found


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_are_owner_and_group_only_under_a_lax_umask(tmp_path: Path) -> None:
    secret = hash_password("a console password", iterations=1000)
    node = NodeProcess(
        tmp_path, extra_toml=f'[broker]\nembedded_worker = false\n[web]\nenabled = false\npassword_hash = "{secret}"\n'
    )
    previous = os.umask(0)  # the node inherits the most permissive umask there is
    try:
        node.start()
    finally:
        os.umask(previous)
    try:
        assert storescu(node.port, small_chest_copies(tmp_path / "ok", 1)).statuses == [0x0000]
        assert send_as_stored(node.port, dicom_dir() / "28_bad_truncated_pixeldata.dcm") == 0xC000
        wait_for(lambda: bool(node.store().list_events(kinds=["analysis.published"])), 60, "the publish")
        written = [
            node.data_dir / "audit.db",
            node.data_dir / "broker.db",
            *node.spool.glob("*/*.dcm"),
            *node.quarantine.iterdir(),
        ]
        assert len(written) == 5, written
        for f in written:
            assert mode(f) & 0o027 == 0, f"{f} is {oct(mode(f))}"
        for folder in (node.data_dir, node.spool, node.quarantine, *node.spool.glob("*/")):
            assert mode(folder) & 0o027 == 0, f"{folder} is {oct(mode(folder))}"

        # The supervised node-queue worker: no settings (password hash) in its environment, a 0600 file.
        assert node.proc is not None
        (worker,) = [
            pid
            for pid in children(node.proc.pid)
            if b"node.analysis.tasks" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
        assert not [v for v in environ if secret.encode() in v]
        (setting,) = [v.decode() for v in environ if v.startswith(b"CXRNODE_SETTINGS_FILE=")]
        settings_file = Path(setting.split("=", 1)[1])
        assert mode(settings_file) == 0o600 and secret in settings_file.read_text()
    finally:
        assert node.stop() == 0
        node.close()
