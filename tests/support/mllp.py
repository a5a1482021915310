"""Start, steer and stop the MLLP listener process (tests/support/mllp_server.py) from a test.

    with MLLPListener(tmp_path / "ris", ack="AE", text="database down") as ris:
        dest = ris.destination()             # an HL7Destination pointing at it
        ...deliver(dest, alert)...           # -> AlertError (AE)
        ris.set_ack("AA")                    # the next message is accepted
        ris.stop(); ris.start()              # down, then up again on the same port
        ris.wait_for_messages(2)             # the ORUs received, as text

The listener is a separate process on 127.0.0.1: the alert code talks to a real socket peer, as it
would to a RIS, and a test can take it down (stop) to see a refused connection.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from node.runtime.config import HL7Destination
from tests.support.net import port_open, wait_for
from tests.support.paths import REPO_ROOT

__all__ = ["MLLPListener"]


class MLLPListener:
    """One listener process writing what it receives under ``directory``; ``start`` waits until it listens."""

    def __init__(
        self,
        directory: Path,
        *,
        ack: str = "AA",
        text: str = "",
        delay: float = 0.0,
        port: int = 0,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port  # 0 until the first start picks one; kept for restarts
        self.host = "127.0.0.1"
        self.tls_cert, self.tls_key = tls_cert, tls_key
        self.proc: subprocess.Popen[bytes] | None = None
        self.set_ack(ack, text=text, delay=delay)

    # --- process --------------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> MLLPListener:
        if self.proc is not None:
            raise RuntimeError("MLLP listener already running")
        (self.dir / "port").unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "tests.support.mllp_server",
            "--out",
            str(self.dir),
            "--port",
            str(self.port),
            "--host",
            self.host,
        ]
        if self.tls_cert is not None:
            cmd += ["--tls-cert", str(self.tls_cert)]
            if self.tls_key is not None:
                cmd += ["--tls-key", str(self.tls_key)]
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 — closed below; the child keeps its own descriptor
        try:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        finally:
            log.close()
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"MLLP listener exited with {proc.returncode}: {self.log_text()[-2000:]}")
            return (self.dir / "port").exists()

        try:
            wait_for(ready, timeout, "MLLP listener")
        except BaseException:
            self.stop()
            raise
        self.port = int((self.dir / "port").read_text())
        return self

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL); the port is closed when this returns."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if self.port:
            wait_for(lambda: not port_open(self.port), 10, "MLLP listener port to close")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> MLLPListener:
        return self.start() if self.proc is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- behaviour ------------------------------------------------------------------------------

    def set_ack(self, ack: str, *, text: str = "", delay: float = 0.0) -> None:
        """How the next messages are answered: AA | AE | AR | none | close | garbage | wrongid."""
        control: dict[str, Any] = {"ack": ack, "text": text, "delay": delay}
        tmp = self.dir / "control.json.tmp"
        tmp.write_text(json.dumps(control))
        os.replace(tmp, self.dir / "control.json")

    def destination(self, name: str = "ris", **overrides: Any) -> HL7Destination:
        values: dict[str, Any] = {
            "type": "hl7",
            "name": name,
            "host": self.host,
            "port": self.port,
            "receiving_application": "RIS",
            "receiving_facility": "HOSP",
        }
        values.update(overrides)
        return HL7Destination(**values)

    # --- what arrived ---------------------------------------------------------------------------

    def messages(self) -> list[str]:
        """Every message received so far (decoded UTF-8), oldest first."""
        return [p.read_bytes().decode("utf-8", "replace") for p in sorted((self.dir / "messages").glob("*.hl7"))]

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[str]:
        wait_for(lambda: len(self.messages()) >= count, timeout, f"{count} HL7 message(s) at the MLLP listener")
        return self.messages()
