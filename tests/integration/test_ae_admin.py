"""AE title administration through the `cxrnode ae` commands, against real peers (DCMTK storescp, the node)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from node.audit import AuditStore
from node.cli.main import main
from tests.support.dcmtk import StoreSCP, echoscu
from tests.support.net import free_port, wait_for
from tests.support.node import NodeProcess

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def config(tmp_path: Path, database_url: str) -> Path:
    path = tmp_path / "admin.toml"
    path.write_text(
        f'[dicom]\nae_title = "CXRNODE"\n[storage]\ndata_dir = "{tmp_path / "var"}"\n'
        f'[database]\nurl = "{database_url}"\n'
    )
    AuditStore.open(database_url).close()  # admin commands need the database a node has made
    return path


def cli(config: Path, *args: str) -> int:
    return main(["ae", args[0], "--config", str(config), *args[1:]])


def test_add_list_remove_are_stored_and_audited(
    config: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        cli(
            config,
            "add",
            "PACS",
            "--host",
            "pacs.example",
            "--port",
            "104",
            "--role",
            "both",
            "--tls",
            "--description",
            "main PACS",
        )
        == 0
    )
    assert cli(config, "add", "MODALITY1", "--role", "source") == 0
    capsys.readouterr()
    assert cli(config, "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(a["name"], a["host"], a["port"], a["role"], a["tls"]) for a in listed] == [
        ("MODALITY1", None, None, "source", False),
        ("PACS", "pacs.example", 104, "both", True),
    ]

    assert cli(config, "remove", "MODALITY1") == 0
    assert cli(config, "remove", "MODALITY1") == 1
    assert "no AE title 'MODALITY1'" in capsys.readouterr().err

    store = AuditStore.open(database_url)
    assert [a.name for a in store.list_ae()] == ["PACS"]
    events = store.list_events(kinds=["ae.added", "ae.removed"])
    assert [(e.kind, e.detail["name"]) for e in events] == [
        ("ae.added", "PACS"),
        ("ae.added", "MODALITY1"),
        ("ae.removed", "MODALITY1"),
    ]
    assert all(e.actor.startswith("cli") for e in events)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "A_TITLE_THAT_IS_TOO_LONG"], "maximum is 16"),
        (["add", "BAD\\NAME"], "DICOM default repertoire"),
        (["add", "   "], "must not be empty"),
        (["add", "PACS", "--host", "h", "--port", "70000"], "outside 1..65535"),
        (["add", "DEST", "--role", "destination"], "needs host and port"),
    ],
)
def test_bad_entries_get_clear_errors(
    config: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert cli(config, *args) == 2
    assert message in capsys.readouterr().err


def test_duplicate_name_is_refused(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(config, "add", "PACS", "--host", "h", "--port", "104") == 0
    assert cli(config, "add", "PACS", "--host", "h", "--port", "105") == 2
    assert "already exists" in capsys.readouterr().err


def test_echo_reports_round_trip_and_failure(
    config: Path, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with StoreSCP(tmp_path / "scp", ae_title="DESTSCP") as scp:
        assert (
            cli(config, "add", "DESTSCP", "--host", "127.0.0.1", "--port", str(scp.port), "--role", "destination") == 0
        )
        assert cli(config, "echo", "DESTSCP") == 0
        out = capsys.readouterr().out
        assert "C-ECHO DESTSCP" in out and "success" in out and " ms)" in out

    assert cli(config, "add", "GONE", "--host", "127.0.0.1", "--port", str(free_port()), "--role", "destination") == 0
    assert cli(config, "echo", "GONE", "--timeout", "3") == 1
    assert "cannot connect to GONE@127.0.0.1" in capsys.readouterr().out
    assert cli(config, "echo", "NOBODY") == 1

    store = AuditStore.open(database_url)
    echoes = store.list_events(kinds=["ae.echo"])
    assert [(e.detail["name"], e.detail["ok"]) for e in echoes] == [("DESTSCP", True), ("GONE", False)]
    outbound = [a for a in store.list_associations() if a.direction == "outbound"]
    assert [(a.called_ae, a.result) for a in outbound] == [("DESTSCP", "released"), ("GONE", "failed")]


def test_policy_follows_the_ae_table_while_the_node_runs(
    node_factory: Callable[..., NodeProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    node = node_factory(sources=("STORESCU",)).start()
    # Seeded from the config's [[ae]] entries at start, audited with actor "config".
    assert [(e.detail["name"], e.actor) for e in node.store().list_events(kinds=["ae.added"])] == [
        ("STORESCU", "config")
    ]
    assert echoscu(node.port, aet="NEWSOURCE").returncode != 0

    assert cli(node.config, "add", "NEWSOURCE", "--host", "127.0.0.1", "--role", "source") == 0
    assert echoscu(node.port, aet="NEWSOURCE").returncode == 0, "no restart needed"

    assert cli(node.config, "add", "FARAWAY", "--host", "192.0.2.10", "--role", "source") == 0
    faraway = echoscu(node.port, aet="FARAWAY")
    assert faraway.returncode != 0 and "Calling AE Title Not Recognized" in faraway.stdout + faraway.stderr

    assert cli(node.config, "add", "RESULTS", "--host", "127.0.0.1", "--port", "1234", "--role", "destination") == 0
    assert echoscu(node.port, aet="RESULTS").returncode != 0, "a destination-only AE may not send"

    assert cli(node.config, "remove", "NEWSOURCE") == 0
    assert echoscu(node.port, aet="NEWSOURCE").returncode != 0
    faraway_reason = "calling AE title 'FARAWAY' not allowed from 127.0.0.1 (expected 192.0.2.10)"
    wait_for(  # a rejection is audited just after the A-ASSOCIATE-RJ went out
        lambda: faraway_reason in [a.reason for a in node.store().list_associations() if a.result == "rejected"],
        15,
        "the refused FARAWAY association to be audited",
    )
    assert node.stop() == 0


def test_stow_destination_and_tokens_from_the_command_line(
    config: Path, database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PACS_TOKEN", "tok-123")
    assert (
        cli(
            config,
            "add",
            "WEBPACS",
            "--role",
            "destination",
            "--url",
            "https://pacs.example/dicom-web/",
            "--auth",
            "bearer",
            "--secret-env",
            "PACS_TOKEN",
        )
        == 0
    )
    secret_file = tmp_path / "pw"
    secret_file.write_text("pw-456\n")
    assert (
        cli(
            config,
            "add",
            "WEBPACS2",
            "--role",
            "destination",
            "--url",
            "http://127.0.0.1:9/dw",
            "--auth",
            "basic",
            "--username",
            "cxr",
            "--secret-file",
            str(secret_file),
        )
        == 0
    )
    assert cli(config, "add", "NOSECRET", "--role", "destination", "--url", "https://x", "--auth", "bearer") == 2
    assert "needs a secret" in capsys.readouterr().err
    store = AuditStore.open(database_url)
    a, b = store.get_ae("WEBPACS"), store.get_ae("WEBPACS2")
    assert a is not None and (a.url, a.auth, a.secret) == ("https://pacs.example/dicom-web", "bearer", "tok-123")
    assert b is not None and (b.username, b.secret) == ("cxr", "pw-456")
    assert cli(config, "list") == 0
    listing = capsys.readouterr().out
    assert "https://pacs.example/dicom-web" in listing and "tok-123" not in listing and "pw-456" not in listing
    assert all("tok-123" not in str(e.detail) for e in store.list_events())

    assert main(["stow-token", "add", "RIS1", "--description", "RIS", "--config", str(config)]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert token.startswith("cxrstow_") and "shown once" in out.err
    assert main(["stow-token", "list", "--config", str(config), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["source"] == "RIS1" and token not in json.dumps(row)
    assert main(["stow-token", "revoke", str(row["id"]), "--config", str(config)]) == 0
    assert main(["stow-token", "revoke", str(row["id"]), "--config", str(config)]) == 1
    assert main(["stow-token", "add", "BAD\\SRC", "--config", str(config)]) == 2
    assert store.list_stow_tokens() == []
    assert [e.kind for e in store.list_events(kinds=["stow_token.added", "stow_token.revoked"])] == [
        "stow_token.added",
        "stow_token.revoked",
    ]
