"""A node with STOW-RS on, a token made the way an administrator makes one (`cxrnode stow-token add`), and
a real DICOMweb client (dicomweb-client, PyPI) pointed at it."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from dicomweb_client.api import DICOMwebClient
from dicomweb_client.web import _Transaction
from pydicom.dataset import Dataset

from tests.support.net import free_port
from tests.support.node import NodeProcess, cxrnode_command

SOURCE = "STOWSRC"


def stow_toml(port: int, *, max_request_mb: int | None = None, extra: str = "") -> str:
    return (
        f'\n[dicomweb]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\n'
        + (f"max_request_mb = {max_request_mb}\n" if max_request_mb else "")
        + extra
    )


def start_stow_node(
    node_factory: Callable[..., NodeProcess], *, max_request_mb: int | None = None, **kwargs: object
) -> tuple[NodeProcess, int]:
    port = free_port()
    # Keys of [dicomweb] itself may come in extra_toml (after its own header, which is dropped here).
    extra = str(kwargs.pop("extra_toml", "")).replace("\n[dicomweb]\n", "\n")
    node = node_factory(extra_toml=stow_toml(port, max_request_mb=max_request_mb, extra=extra), **kwargs).start()
    return node, port


def add_token(node: NodeProcess, source: str = SOURCE) -> str:
    """`cxrnode stow-token add SOURCE`: the token is the one line on stdout."""
    out = subprocess.run(
        [*cxrnode_command(), "stow-token", "add", source, "--config", str(node.config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


def client(port: int, token: str) -> DICOMwebClient:
    return DICOMwebClient(url=f"http://127.0.0.1:{port}/dicomweb", headers={"Authorization": f"Bearer {token}"})


def post_files(dw: DICOMwebClient, files: Sequence[Path | bytes], study: str | None = None) -> Dataset:
    """POST the files' bytes exactly as stored (as a PACS forwards its files), through the client's own
    multipart/related encoder and response parser. `store_instances` would re-encode pydicom data sets,
    and cannot send what pydicom cannot read (the manifest's bad files)."""
    url = dw._get_studies_url(_Transaction.STORE, study)
    data = [f if isinstance(f, bytes) else f.read_bytes() for f in files]
    return dw._http_post_multipart_application_dicom(url, data)
