"""Background processes for the deployment e2e tests: shipped unit command lines, kill -9, logs."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.paths import REPO_ROOT

PRODUCTION = REPO_ROOT / "deploy" / "config" / "cxrnode.production.toml"


def unit_command(unit: str, key: str, instance: str = "") -> list[str]:
    """A shipped systemd unit's Exec line as this checkout runs it (no drift between units and test):
    /opt/cxrnode/bin -> this interpreter's bin, /etc/cxrnode/cxrnode.toml -> the shipped production
    example, %i -> `instance`, %%H (a literal %H for Celery) -> Celery's %h."""
    text = (REPO_ROOT / "deploy" / "systemd" / unit).read_text()
    found = re.search(rf"^{key}=(.+)$", text, re.M)
    assert found is not None, f"{unit} has no {key}"
    line = (
        found.group(1)
        .replace("/opt/cxrnode/bin/", f"{Path(sys.executable).parent}/")
        .replace("/etc/cxrnode/cxrnode.toml", str(PRODUCTION))
        .replace("%i", instance)
        .replace("%%H", "%h")
    )
    return shlex.split(line)


class Proc:
    """A background process in its own session (so kill -9 reaches its pool too), logging to a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.argv, self.env, self.log = name, argv, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode


OPERATIONS = REPO_ROOT / "docs" / "operations.md"


def docs_block(tag: str) -> str:
    """The shell block of docs/operations.md that follows `<!-- quickstart:<tag> ... -->`."""
    found = re.search(rf"<!-- quickstart:{tag}\b[^>]*-->\s*```sh\n(.*?)```", OPERATIONS.read_text(), re.S)
    assert found is not None, f"docs/operations.md has no quickstart:{tag} block"
    return found.group(1)


def install_line(prefix: str) -> str:
    """The line of the quick start's installation block that starts with `prefix`."""
    text = OPERATIONS.read_text()
    start = text.index("**Bare metal (systemd): production quick start.**")
    block = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert block is not None
    lines = [line for line in block.group(1).splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, f"the quick start's installation has {len(lines)} line(s) starting {prefix!r}"
    return lines[0]


class QuickStart:
    """The production quick start's commands, run as written with the host's paths mapped to a test
    folder: /etc/cxrnode -> `etc`, /etc/cxrnode/cxrnode.toml -> the shipped production example,
    /opt/cxrnode/bin -> this interpreter's bin, the cxrnode group -> the current one."""

    def __init__(self, etc: Path) -> None:
        self.etc = etc
        etc.mkdir(parents=True, exist_ok=True)

    def mapped(self, text: str) -> str:
        import grp

        return (
            text.replace("/etc/cxrnode/cxrnode.toml", str(PRODUCTION))
            .replace("/etc/cxrnode/", f"{self.etc}/")
            .replace("/opt/cxrnode/bin/", f"{Path(sys.executable).parent}/")
            .replace("chgrp cxrnode ", f"chgrp {grp.getgrgid(os.getgid()).gr_name} ")
        )

    def sh(self, script: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", "-e", "-c", self.mapped(script)], env=env, capture_output=True, text=True, timeout=timeout
        )

    def write_env_files(self, env: dict[str, str], hosts: dict[str, str]) -> None:
        """Run the env block, with the documented loopback addresses in `hosts` replaced by the test's."""
        script = docs_block("env")
        for documented, actual in hosts.items():
            assert documented in script, f"the quick start's env block no longer has {documented!r}"
            script = script.replace(documented, actual)
        done = self.sh(script, env)
        assert done.returncode == 0, done.stderr

    def env_file(self, name: str) -> dict[str, str]:
        """The variables of one env file as `sh` reads it (`set -a; . FILE`, as the docs' admin commands do)."""
        path = self.etc / name
        keys = re.findall(r"^([A-Z][A-Z0-9_]*)=", path.read_text(), re.M)
        out = subprocess.run(
            ["env", "-i", "sh", "-c", f"set -a; . '{path}'; env -0"], capture_output=True, timeout=30, check=True
        ).stdout.decode()
        values = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
        return {k: values[k] for k in keys}
