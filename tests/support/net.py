"""Loopback ports and waiting for servers."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

RESERVED = {104, 4242, 5432, 6379, 8042, 11112}  # well-known ports a system service may hold


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (never one of the well-known service ports)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in RESERVED:
            return port


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False
