"""The spool: durable commit under the instance's name, quarantine with a reason, stale partial files swept."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from node.ingest.spool import Spool, safe_name


def test_commit_quarantine_and_sweep(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.prepare()
    received = spool.incoming / "tmp1.dcm"
    received.write_bytes(b"data")
    final = spool.commit(received, "1.2.3", "1.2.3.4")
    assert final == spool.root / "1.2.3" / "1.2.3.4.dcm" and final.read_bytes() == b"data"
    assert not received.exists()

    bad = spool.incoming / "tmp2.dcm"
    bad.write_bytes(b"bad bytes")
    kept = spool.quarantine(bad, "9.9", {"status": "0xA900", "reason": "why"})
    assert kept.parent == spool.quarantine_dir and kept.read_bytes() == b"bad bytes"
    assert json.loads(kept.with_suffix(".reason.json").read_text())["reason"] == "why"

    stale, fresh = spool.incoming / "stale.dcm", spool.incoming / "fresh.dcm"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert spool.sweep_incoming(max_age_s=600) == 1
    assert [p.name for p in spool.incoming.iterdir()] == ["fresh.dcm"]
    spool.prepare()  # at start nothing in .incoming was acknowledged: all of it goes
    assert list(spool.incoming.iterdir()) == []


def test_file_names_from_untrusted_uids() -> None:
    assert safe_name("1.2.840.10008") == "1.2.840.10008"
    for hostile in ("../../etc/passwd", "", "1.2/3", "." * 3, "x" * 80):
        name = safe_name(hostile)
        assert "/" not in name and name.startswith("x") and len(name) == 33
