"""node.export.sender over TLS to a DCMTK storescp with a throw-away certificate (openssl CLI)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from node.export.sender import Destination, SendError, client_ssl_context, send
from node.results.common import DeviceInfo
from node.results.seg import build_seg
from tests.support.net import free_port, port_open, wait_for
from tests.support.paths import shared_data
from tests.support.synthetic_results import synthetic_case
from tests.support.tls import self_signed

DICOM = shared_data() / "dicom"


@pytest.fixture
def tls_storescp(tmp_path: Path) -> Iterator[tuple[Destination, Path, Path]]:
    key, cert = self_signed(tmp_path, "storescp", common_name="127.0.0.1")
    out, port = tmp_path / "out", free_port()
    out.mkdir()
    # -ic: the node's client certificate is optional here (the SCP side's policy is not under test).
    proc = subprocess.Popen(
        ["storescp", "-aet", "TLSDEST", "+tls", str(key), str(cert), "-ic", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_open(port), 15, "storescp (TLS)")
        yield Destination("TLSDEST", "127.0.0.1", port, tls=True), cert, out
    finally:
        proc.terminate()
        proc.wait(10)


def test_seg_over_tls(tls_storescp: tuple[Destination, Path, Path]) -> None:
    destination, cert, out = tls_storescp
    case = synthetic_case(DICOM / "02_cr_implicit_le_12bit.dcm")
    seg = build_seg(case.source, case.full, case.result.models, device=DeviceInfo())
    (status,) = send([seg], destination, calling_ae="CXRNODE", ssl_context=client_ssl_context(ca_file=cert))
    assert status.ok
    (received,) = out.iterdir()
    assert pydicom.dcmread(received).SOPInstanceUID == seg.SOPInstanceUID

    with pytest.raises(SendError, match="TLS handshake") as err:  # the system CAs do not trust this certificate
        send([seg], destination, calling_ae="CXRNODE", ssl_context=client_ssl_context())
    assert not err.value.retryable
    with pytest.raises(SendError, match="needs TLS"):
        send([seg], destination, calling_ae="CXRNODE")


def test_echo_over_tls_from_cli_and_console(
    tls_storescp: tuple[Destination, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 17, finding 1: C-ECHO reaches a TLS peer exactly as SEG/SR do, from the CLI and the console."""
    from node.admin.service import AdminService
    from node.audit import AuditStore
    from node.cli.main import main
    from node.runtime.config import load_settings

    destination, cert, _ = tls_storescp
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "var"}"\n[dicom.tls]\nca_file = "{cert}"\n')
    settings = load_settings(config)
    store = AuditStore.open(settings.database_url)
    cli = ["--config", str(config)]
    assert (
        main(
            [
                "ae",
                "add",
                "TLSDEST",
                "--host",
                "127.0.0.1",
                "--port",
                str(destination.port),
                "--tls",
                "--role",
                "destination",
                *cli,
            ]
        )
        == 0
    )
    assert main(["ae", "echo", "TLSDEST", *cli]) == 0
    assert f"C-ECHO TLSDEST at 127.0.0.1:{destination.port}: success" in capsys.readouterr().out

    actions = AdminService(store, calling_ae="CXRNODE", tls=settings.dicom.tls)
    assert actions.echo_ae("TLSDEST", actor="web:admin").ok
    # Without the CA that signed the peer's certificate, the echo fails the way a delivery would.
    untrusting = AdminService(store, calling_ae="CXRNODE")
    failed = untrusting.echo_ae("TLSDEST", actor="web:admin")
    assert not failed.ok and failed.detail.startswith("TLS handshake with TLSDEST@127.0.0.1")

    echoes = store.list_events(kinds=["ae.echo"])
    assert [(e.actor, e.detail["ok"], e.detail["tls"]) for e in echoes] == [
        (echoes[0].actor, True, True),
        ("web:admin", True, True),
        ("web:admin", False, True),
    ]
    assert echoes[0].actor.startswith("cli")
    outbound = [a for a in store.list_associations() if a.direction == "outbound"]
    assert [(a.called_ae, a.result, a.tls) for a in outbound] == [
        ("TLSDEST", "released", True),
        ("TLSDEST", "released", True),
        ("TLSDEST", "failed", True),
    ]
