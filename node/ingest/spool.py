"""Durable files: the spool (accepted instances) and quarantine (refused input, kept for inspection).

A file is durable once it is written, fsynced, renamed into place and its directory fsynced: after a
crash it is either complete under its final name or not there at all. Layout under ``data_dir``::

    spool/.incoming/            temporary files being received (same filesystem, so rename is atomic)
    spool/<study uid>/<sop instance uid>.dcm
    quarantine/<utc time>-<sop instance uid>.dcm  + .reason.json
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"^[0-9.]{1,64}$")


def safe_name(uid: str) -> str:
    """A file name for a UID: the UID itself when it is a well-formed one, else a hash of it."""
    uid = uid.strip()
    if _SAFE_NAME.match(uid) and not uid.startswith("."):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:32]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    # fsync through a fresh descriptor flushes the inode, whichever descriptor wrote the data.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_durably(src: Path, dest: Path) -> None:
    """fsync src, rename it to dest (copy across filesystems), fsync dest's directory."""
    created = not dest.parent.exists()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fsync_file(src)
    try:
        os.replace(src, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}")
        shutil.copyfile(src, tmp)
        fsync_file(tmp)
        os.replace(tmp, dest)
        src.unlink(missing_ok=True)
    fsync_dir(dest.parent)
    if created:
        fsync_dir(dest.parent.parent)


def write_durably(dest: Path, data: bytes) -> None:
    """Write bytes to dest atomically and durably (temp file beside it, fsync, rename, fsync dir)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


class Spool:
    """The node's durable file store under ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.root = self.data_dir / "spool"
        self.incoming = self.root / ".incoming"
        self.quarantine_dir = self.data_dir / "quarantine"

    def prepare(self) -> None:
        """Create the directories and drop temporary files a crash left behind (never acknowledged)."""
        for d in (self.root, self.incoming, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        leftovers = list(self.incoming.iterdir())
        for p in leftovers:
            p.unlink(missing_ok=True)
        if leftovers:
            log.info("removed %d unacknowledged temporary file(s) from %s", len(leftovers), self.incoming)

    def sweep_incoming(self, max_age_s: float) -> int:
        """Remove temporary files not written for max_age_s (an aborted transfer leaves one behind)."""
        cutoff = time.time() - max_age_s
        removed = 0
        for p in self.incoming.iterdir():
            try:
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:
                pass  # finished and renamed meanwhile
        if removed:
            log.info("removed %d stale partial file(s) from %s", removed, self.incoming)
        return removed

    def free_mb(self) -> float:
        usage = shutil.disk_usage(self.root)
        return usage.free / (1024 * 1024)

    def has_room(self, min_free_mb: int) -> bool:
        return self.free_mb() >= min_free_mb

    def path_for(self, study_uid: str, sop_instance_uid: str) -> Path:
        return self.root / safe_name(study_uid) / f"{safe_name(sop_instance_uid)}.dcm"

    def commit(self, received: Path, study_uid: str, sop_instance_uid: str) -> Path:
        """Make a fully received file durable under its spool name; returns the final path."""
        dest = self.path_for(study_uid, sop_instance_uid)
        _move_durably(received, dest)
        return dest

    def quarantine(self, received: Path | None, sop_instance_uid: str, reason: dict[str, Any]) -> Path:
        """Keep refused bytes with a JSON reason file beside them; returns the data file's path."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        dest = self.quarantine_dir / f"{stamp}-{safe_name(sop_instance_uid or 'unknown')}.dcm"
        if received is not None and received.exists():
            _move_durably(received, dest)
        else:
            write_durably(dest, b"")
        reason_file = dest.with_suffix(".reason.json")
        write_durably(reason_file, json.dumps({"time": stamp, **reason}, indent=2, default=str).encode())
        return dest
