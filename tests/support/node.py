"""Run `cxrnode serve` as a subprocess with a temporary configuration (data dir in tmp, free port)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from node.audit import AuditStore
from node.runtime.config import load_settings
from tests.support.net import free_port, wait_for

NODE_AE = "CXRNODE"
SENDER_AE = "STORESCU"


def cxrnode_command() -> list[str]:
    script = Path(sys.executable).parent / "cxrnode"
    return [str(script)] if script.exists() else [sys.executable, "-m", "node.cli.main"]


class NodeProcess:
    """One node: its config file, data dir, port and audit database URL."""

    def __init__(
        self,
        root: Path,
        database_url: str = "",
        *,
        min_free_mb: int = 1,
        extra_toml: str = "",
        sources: tuple[str, ...] = (SENDER_AE,),
        analysis: bool = False,
        storage_toml: str = "",
        port: int | None = None,
    ) -> None:
        self.root = root
        self.data_dir = root / "var"
        self.port = port or free_port()  # given when a peer must know it first (an archive's move destination)
        self.database_url = database_url or f"sqlite:///{self.data_dir / 'audit.db'}"
        self.config = root / "cxrnode.toml"
        self.log = root / "serve.log"
        ae_entries = "".join(f'\n[[ae]]\nname = "{name}"\nhost = "127.0.0.1"\nrole = "source"\n' for name in sources)
        self.config.write_text(
            f'[dicom]\nae_title = "{NODE_AE}"\nhost = "127.0.0.1"\nport = {self.port}\nshutdown_grace_s = 20\n'
            f"{extra_toml}\n"
            f'[storage]\ndata_dir = "{self.data_dir}"\nmin_free_mb = {min_free_mb}\n{storage_toml}\n'
            f'[database]\nurl = "{self.database_url}"\n{ae_entries}'
            # Ingest tests run without the analysis pipeline (no workers): instances stay `queued`.
            + ("" if analysis or "[broker]" in extra_toml else "\n[broker]\nenabled = false\n")
            # The console is tested on its own free port; other node tests run without it.
            + ("" if "[web]" in extra_toml else "\n[web]\nenabled = false\n")
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self._store: AuditStore | None = None

    @property
    def spool(self) -> Path:
        return self.data_dir / "spool"

    @property
    def quarantine(self) -> Path:
        return self.data_dir / "quarantine"

    def start(self, timeout: float = 60) -> NodeProcess:
        offset = self.log.stat().st_size if self.log.exists() else 0
        logf = open(self.log, "ab")  # noqa: SIM115 — handed to the child, closed after the spawn
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [*cxrnode_command(), "serve", "--config", str(self.config)], stdout=logf, stderr=subprocess.STDOUT, env=env
        )
        logf.close()

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"cxrnode serve exited with {self.proc.returncode}:\n{self.log_text()}")
            return "listening as" in self.log.read_text(errors="replace")[offset:]

        wait_for(ready, timeout, "cxrnode serve to listen")
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM and wait; returns the exit status. The default wait is what systemd gives a unit
        (TimeoutStopSec 90 s): the node's own grace for in-flight associations is 60 s
        (`dicom.shutdown_grace_s`), then it stops its workers."""
        if self.proc is None:
            return 0
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(
                f"cxrnode serve did not stop within {timeout:.0f} s:\n{self.log_text()[-4000:]}"
            ) from None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def store(self) -> AuditStore:
        """The node's audit database, as this node: rows a test writes belong to it (a node acts only on
        its own rows, see node.name)."""
        if self._store is None:
            self._store = AuditStore.open(self.database_url, node=load_settings(self.config).node_name)
        return self._store

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if self._store is not None:
                self._store.close()
