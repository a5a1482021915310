"""Run the DCMTK tools (echoscu, storescu, storescp) against the node on loopback."""

from __future__ import annotations

import re
import ssl
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.net import free_port, port_open, wait_for


@dataclass(frozen=True)
class StoreResult:
    returncode: int
    output: str
    responses: dict[str, int]  # SOP Instance UID -> C-STORE response status, for every response received

    @property
    def statuses(self) -> list[int]:
        return list(self.responses.values())

    @property
    def status(self) -> int | None:
        """The one response status (None unless exactly one C-STORE was answered)."""
        return self.statuses[0] if len(self.responses) == 1 else None


_RSP_UID = re.compile(r"Affected SOP Instance UID\s*:\s*(\S+)")
_RSP_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})")


def parse_store_responses(output: str) -> dict[str, int]:
    """C-STORE RSP blocks of `storescu -d` output -> {SOP Instance UID: status}."""
    responses: dict[str, int] = {}
    for block in output.split("Message Type                  : C-STORE RSP")[1:]:
        block = block.split("END DIMSE MESSAGE")[0]
        uid, status = _RSP_UID.search(block), _RSP_STATUS.search(block)
        if uid and status:
            responses[uid.group(1)] = int(status.group(1), 16)
    return responses


def storescu_opts(row: dict[str, str]) -> list[str] | None:
    """The storescu options the manifest suggests for a file, or None when it cannot be sent as stored."""
    hint = row["storescu_opts"].split("|")[0].strip()
    if not hint.startswith("use "):
        return None
    opts = hint[4:].strip()
    return [] if opts == "(default)" else opts.split()


def echoscu(
    port: int, *, aet: str = "STORESCU", aec: str = "CXRNODE", extra: Sequence[str] = (), timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-aet", aet, "-aec", aec, *extra, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def storescu(
    port: int,
    files: Sequence[Path],
    *,
    aet: str = "STORESCU",
    aec: str = "CXRNODE",
    opts: Sequence[str] = (),
    timeout: float = 120,
) -> StoreResult:
    """Send files on one association (going on after a failure status, -nh); parse every response status."""
    cmd = ["storescu", "-d", "-nh", "-aet", aet, "-aec", aec, *opts, "127.0.0.1", str(port), *map(str, files)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    return StoreResult(proc.returncode, out, parse_store_responses(out))


class StoreSCP:
    """A DCMTK storescp on a free port (a destination for echo/sending tests)."""

    def __init__(self, out_dir: Path, ae_title: str = "DESTSCP") -> None:
        self.out_dir = out_dir
        self.ae_title = ae_title
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> StoreSCP:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["storescp", "-aet", self.ae_title, "-od", str(self.out_dir), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: port_open(self.port), 15, "storescp")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def send_as_stored(
    port: int, path: Path, *, aet: str = "STORESCU", aec: str = "CXRNODE", ssl_context: ssl.SSLContext | None = None
) -> int | None:
    """Send a file's bytes as they are with pynetdicom (for files storescu refuses to read).

    Chunked sending (``STORE_SEND_CHUNKED_DATASET``) takes the SOP Class/Instance UIDs and transfer
    syntax from the file meta and streams the data set without parsing it. Returns the response
    status, or None when no response came.
    """
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE, _config

    meta = read_file_meta_info(path)
    ae = AE(ae_title=aet)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        tls_args = (ssl_context, "127.0.0.1") if ssl_context is not None else None
        assoc = ae.associate("127.0.0.1", port, ae_title=aec, tls_args=tls_args)
        if not assoc.is_established:
            raise RuntimeError("association not established")
        try:
            rsp = assoc.send_c_store(path)
            return int(rsp.Status) if "Status" in rsp else None
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
