"""Configuration: TOML + CXRNODE_* environment, validated; `cxrnode config check` names the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.cli.main import main
from node.runtime.config import ConfigError, load_settings, validate_ae_title, validate_port
from tests.support.paths import REPO_ROOT
from tests.support.tls import self_signed

EXAMPLES = sorted((REPO_ROOT / "deploy" / "config").glob("*.toml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cxrnode.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    s = load_settings()
    assert (s.dicom.ae_title, s.dicom.port, s.storage.data_dir) == ("CXRNODE", 11112, Path("./var"))
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith("audit.db")
    assert [r.name for r in s.rules] == ["chest-frontal", "secondary-capture-chest"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_shipped_examples_pass_config_check(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if "production" in path.name:
        # Its certificates live in /etc/cxrnode/tls on a real host; point at real ones made here.
        key, cert = self_signed(tmp_path, "node")
        for name, value in (("CERT_FILE", cert), ("KEY_FILE", key), ("CA_FILE", cert)):
            monkeypatch.setenv(f"CXRNODE_DICOM__TLS__{name}", str(value))
        monkeypatch.setenv("CXRNODE_STORAGE__DATA_DIR", str(tmp_path / "data"))
    assert main(["config", "check", str(path)]) == 0
    assert capsys.readouterr().out.startswith("OK")


# -- config check runs every start-time check, the same function serve runs (issue 17, finding 6) ------


def test_config_check_reports_what_would_stop_the_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key, cert = self_signed(tmp_path, "node")
    other_key, _ = self_signed(tmp_path, "other")
    (tmp_path / "afile").write_text("")
    path = write(
        tmp_path,
        '[storage]\ndata_dir = "afile/var"\n'
        f'[dicom.tls]\nenabled = true\ncert_file = "{cert}"\nkey_file = "missing.key"\n'
        "[web]\nproduction = true\n",
    )
    assert main(["config", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path} cannot start the node:" in err
    assert f"storage.data_dir: {tmp_path / 'afile'} is not a folder" in err
    assert f"dicom.tls.key_file: {tmp_path / 'missing.key'} does not exist" in err
    assert "web: web.production is true but no console user is configured" in err
    # serve runs the same checks first and stops with the same message (nothing is bound or created).
    assert main(["serve", "--config", str(path)]) == 1
    assert capsys.readouterr().err.endswith(err)
    # A key that is not the certificate's is found too, as the listener would find it.
    path = write(
        tmp_path,
        f'[storage]\ndata_dir = "{tmp_path / "var"}"\n'
        f'[dicom.tls]\nenabled = true\ncert_file = "{cert}"\nkey_file = "{other_key}"\n',
    )
    assert main(["config", "check", str(path)]) == 1
    assert "dicom.tls: the certificate, key or CA cannot be loaded" in capsys.readouterr().err
    assert key.exists()


def test_config_check_reports_an_unusable_session_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "short.key").write_text("abc\n")
    path = write(tmp_path, f'[storage]\ndata_dir = "{tmp_path / "var"}"\n[web]\nsession_key_file = "short.key"\n')
    assert main(["config", "check", str(path)]) == 1
    assert f"web.session_key_file {tmp_path / 'short.key'} holds 3 bytes" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[dicom]\nportt = 104\n", "dicom.portt: unknown key"),
        ("[dicom]\nport = 70000\n", "dicom.port"),
        ('[dicom]\nae_title = "MUCH_TOO_LONG_AE_TITLE"\n', "dicom.ae_title"),
        ('[[ae]]\nname = "BAD\\\\AE"\n', "ae.0.name"),
        ('[[rules]]\nname = "x"\naction = "delete"\n', "rules.0.action"),
        ("[storage\n", "not valid TOML"),
    ],
)
def test_config_check_names_the_bad_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, named: str
) -> None:
    assert main(["config", "check", str(write(tmp_path, text))]) == 1
    assert named in capsys.readouterr().err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(tmp_path / "nope.toml")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[dicom]\nport = 11113\n")
    monkeypatch.setenv("CXRNODE_DICOM__PORT", "11114")
    assert load_settings(path).dicom.port == 11114
    monkeypatch.setenv("CXRNODE_DICOM__PORT", "not-a-port")
    with pytest.raises(ConfigError, match=r"dicom.port"):
        load_settings(path)


def test_ae_title_and_port_validators() -> None:
    assert validate_ae_title("PACS ") == "PACS"
    for bad in ["", "    ", "A" * 17, "BAD\\AE", "TAB\tAE"]:
        with pytest.raises(ValueError):
            validate_ae_title(bad)
    assert validate_port(104) == 104
    for bad_port in (0, 65536):
        with pytest.raises(ValueError):
            validate_port(bad_port)


def test_sr_without_seg_is_refused_with_the_reason() -> None:
    import pytest

    from node.runtime.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match=r"results.sr needs results.seg"):
        load_settings(None, results={"seg": False, "sr": True})
    assert not load_settings(None, results={"seg": True, "sr": False}).results.sr


# -- where commands find the configuration, and what relative paths mean (issue 17, finding 3) --------


def test_find_config_order(tmp_path: Path) -> None:
    from node.runtime.config import find_config

    system = tmp_path / "etc.toml"
    assert find_config(None, environ={}, system=system) is None  # nothing: built-in defaults
    system.write_text("")
    assert find_config(None, environ={}, system=system) == system
    assert find_config(None, environ={"CXRNODE_CONFIG": "/x/env.toml"}, system=system) == Path("/x/env.toml")
    assert find_config("/x/arg.toml", environ={"CXRNODE_CONFIG": "/x/env.toml"}, system=system) == Path("/x/arg.toml")


def test_relative_paths_are_relative_to_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    path = write(
        conf_dir,
        '[storage]\ndata_dir = "data"\n[database]\nurl = "sqlite:///db/audit.db"\n'
        '[broker]\nurl = "sqla+sqlite:///q.db"\n'
        '[dicom.tls]\nenabled = true\ncert_file = "tls/n.crt"\nkey_file = "/abs/n.key"\n'
        '[web]\nsession_key_file = "k"\n'
        '[[triage.destinations]]\nname = "hook"\ntype = "webhook"\nurl = "https://x"\n'
        'secret_file = "hook.secret"\n',
    )
    monkeypatch.chdir(tmp_path)
    s = load_settings(path)
    assert s.storage.data_dir == conf_dir / "data"
    assert s.database_url == f"sqlite:///{conf_dir / 'db' / 'audit.db'}"
    assert s.broker_url == f"sqla+sqlite:///{conf_dir / 'q.db'}"
    assert (s.dicom.tls.cert_file, s.dicom.tls.key_file) == (conf_dir / "tls" / "n.crt", Path("/abs/n.key"))
    assert s.web.session_key_file == conf_dir / "k"
    assert s.triage.destinations[0].secret_file == conf_dir / "hook.secret"  # type: ignore[union-attr]
    # The environment keeps its meaning (relative to the working directory), as do absolute URLs.
    monkeypatch.setenv("CXRNODE_STORAGE__DATA_DIR", "envdir")
    monkeypatch.setenv("CXRNODE_DATABASE__URL", "sqlite:////abs/a.db")
    s = load_settings(path)
    assert (s.storage.data_dir, s.database_url) == (Path("envdir"), "sqlite:////abs/a.db")


def test_config_check_finds_the_file_like_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, '[dicom]\nae_title = "FROMENV"\n')
    monkeypatch.setenv("CXRNODE_CONFIG", str(path))
    assert main(["config", "check"]) == 0
    assert f"OK: {path} (AE title FROMENV" in capsys.readouterr().out
    monkeypatch.setenv("CXRNODE_CONFIG", str(tmp_path / "missing.toml"))
    assert main(["config", "check"]) == 1
    assert "missing.toml does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", [["ae", "add", "PACS"], ["ae", "list"], ["audit", "studies"], ["exports", "list"], ["reanalyze", "1"]]
)
def test_admin_commands_refuse_a_fresh_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CXRNODE_CONFIG", raising=False)
    monkeypatch.setattr("node.runtime.config.SYSTEM_CONFIG", tmp_path / "no-such" / "cxrnode.toml")
    path = write(tmp_path, '[storage]\ndata_dir = "nodevar"\n')
    assert main([*command, "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"no audit database at sqlite:///{tmp_path / 'nodevar' / 'audit.db'} (configuration {path})" in err
    assert main(command) == 1
    assert "looked for --config, $CXRNODE_CONFIG, /etc/cxrnode/cxrnode.toml" in capsys.readouterr().err
    assert not (tmp_path / "var").exists() and not (tmp_path / "nodevar").exists()  # nothing created


def test_admin_commands_use_the_node_database_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.audit import AuditStore

    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    path = write(conf_dir, '[storage]\ndata_dir = "var"\n')
    AuditStore.open(load_settings(path).database_url).close()  # what `cxrnode serve` does at start
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("CXRNODE_CONFIG", str(path))
    assert main(["ae", "add", "PACS", "--host", "pacs", "--port", "104"]) == 0
    assert main(["ae", "list", "--json"]) == 0
    assert '"name": "PACS"' in capsys.readouterr().out
    assert not (elsewhere / "var").exists()


def test_cxrnode_worker_refuses_a_configuration_without_broker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[broker]\nurl = ""\n')
    assert main(["worker", "--config", str(config)]) == 1
    assert f"no broker configured: broker.url is empty in {config}" in capsys.readouterr().err


def test_cxrnode_worker_passes_its_hostname_to_celery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path, '[broker]\nurl = "redis://127.0.0.1:6379/0"\n')
    execs: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr("os.execve", lambda path, argv, env: execs.append((path, argv, env)))
    assert main(["worker", "--config", str(config), "--hostname", "gpu1@%h", "--concurrency", "2"]) == 0
    ((_, argv, env),) = execs
    assert argv[argv.index("--hostname") + 1] == "gpu1@%h" and argv[argv.index("-Q") + 1] == "inference"
    assert argv[argv.index("-c") + 1] == "2"
    assert env["CXRNODE_BROKER__URL"] == "redis://127.0.0.1:6379/0"
    assert main(["worker", "--config", str(config)]) == 0
    assert "--hostname" not in execs[-1][1]  # Celery's default, celery@<host>


def test_production_console_needs_tls_or_a_declared_tls_proxy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Issue 13, finding 6: production served the console (passwords, PHI) over plain HTTP.
    from node.web.auth import hash_password

    key, cert = self_signed(tmp_path, "console")
    users = f'password_hash = "{hash_password("secret-password", iterations=1000)}"\n'
    base = f'[storage]\ndata_dir = "{tmp_path / "var"}"\n[web]\nproduction = true\n{users}'
    assert main(["config", "check", str(write(tmp_path, base))]) == 1
    assert "web.production serves the console over TLS only" in capsys.readouterr().err
    assert main(["config", "check", str(write(tmp_path, base + "behind_tls_proxy = true\n"))]) == 0
    capsys.readouterr()
    assert (
        main(["config", "check", str(write(tmp_path, base + f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'))])
        == 0
    )
    capsys.readouterr()
    assert main(["config", "check", str(write(tmp_path, base + f'tls_cert_file = "{cert}"\n'))]) == 1
    assert "web.tls_cert_file and web.tls_key_file go together" in capsys.readouterr().err


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_analyse_what_the_built_in_rules_analyse(path: Path) -> None:
    """README: the default rules analyse CR/DX chest and chest Secondary Captures; so do both examples."""
    from node.runtime.config import default_rules

    analysed = [(r.name, r.match) for r in load_settings(path).rules if r.action == "analyze"]
    assert analysed == [(r.name, r.match) for r in default_rules()]


def test_the_node_warns_about_the_workers_old_broker_variable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CXRNODE_BROKER_URL", "redis://pacs-broker:6379/0")
    with caplog.at_level("WARNING", logger="node.runtime.config"):
        assert load_settings().broker.url == ""
    assert "CXRNODE_BROKER_URL is set but the node reads CXRNODE_BROKER__URL" in caplog.text


def test_stow_rs_tls_settings_are_checked_before_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from node.web.auth import hash_password

    key, cert = self_signed(tmp_path, "stow")
    web = (
        f"[web]\nproduction = true\nbehind_tls_proxy = true\n"
        f'password_hash = "{hash_password("secret-password", iterations=1000)}"\n'
    )
    base = f'[storage]\ndata_dir = "{tmp_path / "var"}"\n{web}[dicomweb]\nenabled = true\n'
    assert main(["config", "check", str(write(tmp_path, base + 'host = "0.0.0.0"\n'))]) == 1
    assert "serves STOW-RS on 0.0.0.0 over TLS only" in capsys.readouterr().err
    assert main(["config", "check", str(write(tmp_path, base + 'host = "127.0.0.1"\n'))]) == 0
    capsys.readouterr()
    tls = f'host = "0.0.0.0"\ntls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'
    assert main(["config", "check", str(write(tmp_path, base + tls))]) == 0
    capsys.readouterr()
    assert main(["config", "check", str(write(tmp_path, base + f'tls_cert_file = "{cert}"\n'))]) == 1
    assert "dicomweb.tls_cert_file and dicomweb.tls_key_file go together" in capsys.readouterr().err
    assert (
        main(["config", "check", str(write(tmp_path, base + f'tls_cert_file = "{key}"\ntls_key_file = "{key}"\n'))])
        == 1
    )
    assert "dicomweb.tls: the certificate or key cannot be loaded" in capsys.readouterr().err
