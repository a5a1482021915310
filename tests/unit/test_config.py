"""Configuration: TOML + CXRNODE_* environment, validated; `cxrnode config check` names the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.cli import main
from node.config import ConfigError, load_settings, validate_ae_title, validate_port
from tests.support.paths import REPO_ROOT

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
def test_shipped_examples_pass_config_check(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", str(path)]) == 0
    assert capsys.readouterr().out.startswith("OK")


@pytest.mark.parametrize(("text", "named"), [
    ("[dicom]\nportt = 104\n", "dicom.portt: unknown key"),
    ("[dicom]\nport = 70000\n", "dicom.port"),
    ('[dicom]\nae_title = "MUCH_TOO_LONG_AE_TITLE"\n', "dicom.ae_title"),
    ('[[ae]]\nname = "BAD\\\\AE"\n', "ae.0.name"),
    ('[[rules]]\nname = "x"\naction = "delete"\n', "rules.0.action"),
    ("[storage\n", "not valid TOML"),
])
def test_config_check_names_the_bad_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                        named: str) -> None:
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
    with pytest.raises(ConfigError, match="dicom.port"):
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

    from node.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="results.sr needs results.seg"):
        load_settings(None, results={"seg": False, "sr": True})
    assert not load_settings(None, results={"seg": True, "sr": False}).results.sr
