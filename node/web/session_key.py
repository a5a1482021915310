"""The key that signs console session cookies, kept in a file so sessions outlive restarts.

`web.session_key_file` names the file (default `<storage.data_dir>/web-session.key`). When it is
missing it is generated once with `secrets` and published atomically: written to a private
temporary file (mode 0600, fsynced), then hard-linked to its name, which fails if another process
got there first — the loser reads the winner's key, so two consoles starting together agree.
A key provisioned by hand (`openssl rand -hex 32 > web-session.key`) is used as is. The key is
never logged; only its path is.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from node.ingest.spool import fsync_dir
from node.runtime.config import Settings
from node.web.auth import AuthConfigError

log = logging.getLogger(__name__)

FILE_NAME = "web-session.key"
MIN_KEY_BYTES = 32


def key_path(settings: Settings) -> Path:
    return settings.web.session_key_file or settings.storage.data_dir / FILE_NAME


def revoked_path(settings: Settings) -> Path:
    """Where logged-out sessions are listed: beside the key, so consoles sharing the key share it too."""
    path = key_path(settings)
    return path.with_name(f"{path.name}.revoked")


def load_or_create(path: Path) -> bytes:
    """The session key stored in `path` (created when missing). Raises AuthConfigError if it is unusable."""
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(MIN_KEY_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            log.info("web console: new session key in %s", path)
        except FileExistsError:
            pass  # another console process created it a moment ago: use theirs
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return _read(path)


def check_key_file(path: Path) -> None:
    """Raise AuthConfigError when an existing key file is unusable (what the console would refuse)."""
    _read(path)


def _read(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        key = path.read_bytes().strip()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise AuthConfigError(f"web.session_key_file {path} cannot be read: {e}") from e
    if len(key) < MIN_KEY_BYTES:
        raise AuthConfigError(
            f"web.session_key_file {path} holds {len(key)} bytes; use at least {MIN_KEY_BYTES} "
            "(e.g. openssl rand -hex 32), or delete it to have one generated"
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        # Anyone who can read it can forge a session: say so, but a shared-group deployment may want it.
        log.warning(
            "web.session_key_file %s is accessible to group/others (mode %o): chmod 600 it", path, stat.S_IMODE(mode)
        )
    return key
