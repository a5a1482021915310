"""Throw-away TLS material for tests: one self-signed certificate per peer, made by the openssl CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path


def self_signed(folder: Path, name: str, *, common_name: str | None = None) -> tuple[Path, Path]:
    """(key, certificate) PEM files `<name>.key` and `<name>.crt` in `folder`, valid two days for
    127.0.0.1 (subjectAltName), so that host-name checking clients accept a loopback server."""
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={common_name or name}", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return key, cert
