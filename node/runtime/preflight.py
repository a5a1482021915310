"""Start-time checks of a configuration, shared by `cxrnode serve` and `cxrnode config check`.

Why one function: `config check` (the systemd unit's ExecStartPre, and what an administrator runs
after an edit) used to validate only the file's syntax, so it said OK to configurations that then
stopped at start: a TLS certificate path that does not exist, a production console with no user.
Everything `serve` would refuse before receiving a single image is checked here, and `serve` runs
the same function first, so the two cannot drift.

The checks need no running service: the database and the broker are not contacted (they may be
down at boot and `serve` waits for them); files, keys and permissions are.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

from node.runtime.config import ConfigError, Settings

log = logging.getLogger(__name__)


def _file_problem(key: str, path: Path | None) -> str | None:
    if path is None:
        return None
    if not path.is_file():
        return f"{key}: {path} does not exist" if not path.exists() else f"{key}: {path} is not a file"
    if not os.access(path, os.R_OK):
        return f"{key}: {path} cannot be read by this user"
    return None


def _writable_dir_problem(key: str, path: Path) -> str | None:
    """A folder the node must write: it exists and is writable, or its nearest existing parent is."""
    target = path.resolve()
    probe = target
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"{key}: {probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == target else f"cannot be created ({probe} is not writable)"
        return f"{key}: {target} {what} by this user"
    return None


def _tls_problems(settings: Settings) -> list[str]:
    tls = settings.dicom.tls
    if not tls.enabled:
        return []
    problems = [
        p
        for p in (
            _file_problem("dicom.tls.cert_file", tls.cert_file),
            _file_problem("dicom.tls.key_file", tls.key_file),
            _file_problem("dicom.tls.ca_file", tls.ca_file),
        )
        if p
    ]
    if problems:
        return problems
    from node.ingest.scp import server_ssl_context

    try:
        server_ssl_context(tls)  # what the listener loads: a key that does not match its certificate, ...
    except (ssl.SSLError, OSError, ValueError) as e:
        problems.append(f"dicom.tls: the certificate, key or CA cannot be loaded: {e}")
    return problems


def console_problems(settings: Settings) -> list[str]:
    """Why the console (in `serve`, or alone: `python -m node.web`) would refuse to start."""
    web = settings.web
    if not web.enabled:
        return []
    from node.web.auth import AuthConfigError, resolve_users
    from node.web.session_key import check_key_file, key_path

    problems = []
    try:
        resolve_users(
            [(u.name, u.password_hash, u.role) for u in web.users],
            admin_user=web.admin_user,
            password_hash=web.password_hash,
            production=web.production,
        )
    except AuthConfigError as e:
        problems.append(f"web: {e}")
    path = key_path(settings)
    if path.exists():
        try:
            check_key_file(path)
        except AuthConfigError as e:
            problems.append(str(e))
    elif problem := _writable_dir_problem("web.session_key_file", path.parent):
        problems.append(f"{problem} (the session key is created there at the first start)")
    problems += _console_tls_problems(settings)
    return problems


def _console_tls_problems(settings: Settings) -> list[str]:
    """Production serves the console (passwords, PHI) over TLS only: its own, or a proxy's, said so."""
    web = settings.web
    if web.tls or (web.tls_cert_file is None) != (web.tls_key_file is None):
        return _server_tls_problems("web", web.tls_cert_file, web.tls_key_file)
    if web.production and not web.behind_tls_proxy:
        return [
            "web.production serves the console over TLS only: set web.tls_cert_file and web.tls_key_file, "
            "or web.behind_tls_proxy = true when a reverse proxy terminates TLS in front of it "
            "(docs/operations.md)"
        ]
    return []


def start_problems(settings: Settings) -> list[str]:
    """Every reason `cxrnode serve` would refuse to start with `settings`, one line each (empty: none)."""
    problems = []
    if problem := _writable_dir_problem("storage.data_dir", settings.storage.data_dir):
        problems.append(problem)
    problems += _tls_problems(settings)
    problems += console_problems(settings)
    problems += _dicomweb_problems(settings)
    return problems


def _dicomweb_problems(settings: Settings) -> list[str]:
    """STOW-RS takes bearer tokens and PHI: its TLS files must load, and production does not serve it in
    clear text beyond this host (behind a TLS proxy, bind it to 127.0.0.1)."""
    d = settings.dicomweb
    if not d.enabled:
        return []
    if d.tls or (d.tls_cert_file is None) != (d.tls_key_file is None):
        return _server_tls_problems("dicomweb", d.tls_cert_file, d.tls_key_file)
    if settings.web.production and d.host not in ("127.0.0.1", "::1", "localhost"):
        return [
            f"web.production serves STOW-RS on {d.host} over TLS only: set dicomweb.tls_cert_file and "
            "dicomweb.tls_key_file, or bind dicomweb.host to 127.0.0.1 behind a TLS proxy"
        ]
    return []


def check_start(settings: Settings, source: str) -> None:
    """Raise ConfigError listing every start problem of `settings` (loaded from `source`)."""
    problems = start_problems(settings)
    if problems:
        raise ConfigError("\n".join([f"{source} cannot start the node:", *(f"  {p}" for p in problems)]))


def _server_tls_problems(section: str, cert: Path | None, key: Path | None) -> list[str]:
    """An HTTPS server's `<section>.tls_cert_file`/`tls_key_file`: both given, readable, and loadable."""
    if (cert is None) != (key is None):
        return [f"{section}.tls_cert_file and {section}.tls_key_file go together"]
    problems = [
        p for p in (_file_problem(f"{section}.tls_cert_file", cert), _file_problem(f"{section}.tls_key_file", key)) if p
    ]
    if not problems:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
        except (ssl.SSLError, OSError) as e:
            problems.append(f"{section}.tls: the certificate or key cannot be loaded: {e}")
    return problems
