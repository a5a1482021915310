"""HL7 v2.5.1 ORU^R01 alerts: the message read back with hl7apy, and delivery over MLLP to a real
listener process (tests/support/mllp_server.py) that answers AA, AE, AR, nothing, or nonsense."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message

from node.alerts.hl7 import build_oru, deliver, parse_ack, unescape
from node.alerts.message import NOT_FOR_DIAGNOSTIC_USE, AlertError, AlertModel, Prior, TriageAlert
from node.export.sender import client_ssl_context
from node.runtime.config import HL7Destination
from tests.support.mllp import MLLPListener
from tests.support.net import free_port
from tests.support.paths import REPO_ROOT
from tests.support.tls import self_signed

NASTY = "a|b^c&d~e\\f \\F\\ g\r\nh"  # every delimiter, the escape character, an escape sequence, CR LF


def make_alert(**overrides: Any) -> TriageAlert:
    values: dict[str, Any] = dict(
        alert_id="5f0c8a3e9b2d4c6f8e1a7b3c5d9e0f12",
        created_at="2026-12-02T10:15:30+00:00",
        level="critical",
        reasons=["pneumothorax probability 0.91 >= 0.5", "severity up by 2 against the prior"],
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        accession_number="ACC0001",
        revision=1,
        severity_score=4,
        severity_change=2,
        prior=Prior(study_instance_uid="1.2.826.0.1.3680043.8.498.0", study_date="20261101", severity_score=2),
        pneumothorax_present=True,
        pneumothorax_probability=0.91,
        pneumothorax_side="right",
        models=[
            AlertModel("lung", "1.0.0", "validated"),
            AlertModel("opacity", "1.1.0", "validated"),
            AlertModel("pneumothorax", "0.3.0", "experimental"),
        ],
        experimental=True,
        note=NOT_FOR_DIAGNOSTIC_USE,
        patient_id="PAT-42",
        issuer_of_patient_id="HOSP",
        patient_name="Doe^Jane^Q",
        patient_birth_date="19700131",
        patient_sex="F",
        study_date="20261202",
        study_time="101500.25",
    )
    values.update(overrides)
    return TriageAlert(**values)


DEST = HL7Destination(
    type="hl7",
    name="ris",
    host="127.0.0.1",
    port=2575,
    sending_application="CXRNODE",
    sending_facility="RADIOLOGY",
    receiving_application="RIS",
    receiving_facility="HOSP",
)


def parsed(er7: str) -> Message:
    message = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert message.validate()
    return message


def observations(message: Message) -> list[Any]:
    order = message.oru_r01_patient_result.oru_r01_order_observation
    return [group.obx for group in order.oru_r01_observation]


def obx_by_code(message: Message) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for obx in observations(message):
        found.setdefault(obx.obx_3.ce_1.to_er7(), []).append(obx)
    return found


def value(obx: Any) -> str:
    """OBX-5 as text; TX repetitions (lines) joined with a space."""
    return " ".join(unescape(line.to_er7()) for line in obx.obx_5)


@pytest.fixture
def ris(tmp_path: Path) -> Iterator[MLLPListener]:
    with MLLPListener(tmp_path / "ris") as listener:
        yield listener


# --- the message ---------------------------------------------------------------------------------


def test_oru_holds_every_field() -> None:
    alert = make_alert()
    er7 = build_oru(alert, DEST)
    assert er7.startswith(
        "MSH|^~\\&|CXRNODE|RADIOLOGY|RIS|HOSP|20261202101530+0000||ORU^R01^ORU_R01|"
        "5f0c8a3e9b2d4c6f8e1a7b3c5d9e0f12|P|2.5.1"
    )
    assert "\n" not in er7 and er7.isascii()
    m = parsed(er7)
    assert m.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert m.msh.msh_10.to_er7() == alert.alert_id
    assert m.msh.msh_11.to_er7() == "P" and m.msh.msh_12.to_er7() == "2.5.1"

    pid = m.oru_r01_patient_result.oru_r01_patient.pid
    assert pid.pid_3.to_er7() == "PAT-42^^^HOSP^MR"
    assert pid.pid_3.cx_4.to_er7() == "HOSP"  # issuer of patient id = assigning authority
    assert pid.pid_5.to_er7() == "Doe^Jane^Q"
    assert pid.pid_7.to_er7() == "19700131"
    assert pid.pid_8.to_er7() == "F"

    order = m.oru_r01_patient_result.oru_r01_order_observation
    obr = order.obr
    assert obr.obr_2.to_er7() == obr.obr_3.to_er7() == "ACC0001"
    assert obr.obr_4.to_er7() == "CXRTRIAGE^Chest X-ray AI triage^99CXR"
    assert obr.obr_7.to_er7() == "20261202101500"
    assert obr.obr_25.to_er7() == "F"
    assert order.orc.orc_2.to_er7() == "ACC0001"

    obx = obx_by_code(m)
    assert [o.obx_1.to_er7() for o in observations(m)] == [str(i) for i in range(1, len(observations(m)) + 1)]
    assert {o.obx_11.to_er7() for o in observations(m)} == {"F"}
    (study,) = obx["110180"]
    assert study.obx_2.to_er7() == "ST" and value(study) == alert.study_instance_uid
    assert study.obx_3.to_er7() == "110180^Study Instance UID^DCM"
    (level,) = obx["TRIAGE"]
    assert level.obx_2.to_er7() == "CWE" and level.obx_5.to_er7() == "critical^Critical^99CXR"
    assert level.obx_8.to_er7() == "AA"
    assert [value(o) for o in obx["TRIAGEREASON"]] == alert.reasons
    assert [o.obx_4.to_er7() for o in obx["TRIAGEREASON"]] == ["1", "2"]
    (severity,) = obx["SEVERITY"]
    assert severity.obx_2.to_er7() == "NM" and value(severity) == "4" and severity.obx_7.to_er7() == "0-6"
    (change,) = obx["SEVERITYCHANGE"]
    assert change.obx_2.to_er7() == "NM" and value(change) == "2"
    assert value(obx["PRIORSTUDYUID"][0]) == "1.2.826.0.1.3680043.8.498.0"
    assert obx["PRIORSTUDYDATE"][0].obx_2.to_er7() == "DT" and value(obx["PRIORSTUDYDATE"][0]) == "20261101"
    assert value(obx["PRIORSEVERITY"][0]) == "2"
    (ptx,) = obx["36118008"]
    assert ptx.obx_3.to_er7() == "36118008^Pneumothorax^SCT"
    assert ptx.obx_2.to_er7() == "CWE" and ptx.obx_5.to_er7() == "52101004^Present^SCT"
    assert obx["PTXSIDE"][0].obx_5.to_er7() == "24028007^Right^SCT"
    (probability,) = obx["PTXPROB"]
    assert probability.obx_2.to_er7() == "NM" and float(value(probability)) == pytest.approx(0.91)
    assert [value(o) for o in obx["AIMODEL"]] == [
        "lung 1.0.0 (validated)",
        "opacity 1.1.0 (validated)",
        "pneumothorax 0.3.0 (experimental)",
    ]
    (note,) = obx["NOTE"]
    assert note.obx_2.to_er7() == "TX" and value(note) == NOT_FOR_DIAGNOSTIC_USE


def test_control_id_override_and_absent_findings() -> None:
    alert = make_alert(
        level="routine",
        reasons=["no analysable image"],
        severity_score=None,
        severity_change=None,
        prior=None,
        pneumothorax_present=None,
        pneumothorax_probability=None,
        pneumothorax_side=None,
        models=[],
        experimental=False,
        note="",
    )
    m = parsed(build_oru(alert, DEST, control_id="CTRL-1"))
    assert m.msh.msh_10.to_er7() == "CTRL-1"
    assert sorted(obx_by_code(m)) == ["110180", "TRIAGE", "TRIAGEREASON"]
    assert obx_by_code(m)["TRIAGE"][0].obx_5.to_er7() == "routine^Routine^99CXR"


def test_note_present_only_when_set() -> None:
    assert "NOTE" in obx_by_code(parsed(build_oru(make_alert(), DEST)))
    validated = make_alert(experimental=False, note="", models=[AlertModel("lung", "1.0.0", "validated")])
    er7 = build_oru(validated, DEST)
    assert "NOTE" not in obx_by_code(parsed(er7))
    assert "diagnostic" not in er7.lower()


def test_absent_pneumothorax_and_sides() -> None:
    m = parsed(
        build_oru(make_alert(pneumothorax_present=False, pneumothorax_side=None, pneumothorax_probability=0.02), DEST)
    )
    obx = obx_by_code(m)
    assert obx["36118008"][0].obx_5.to_er7() == "2667000^Absent^SCT"
    assert "PTXSIDE" not in obx
    both = obx_by_code(parsed(build_oru(make_alert(pneumothorax_side="both"), DEST)))
    assert both["PTXSIDE"][0].obx_5.to_er7() == "51440002^Right and left^SCT"


def test_revision_2_is_a_correction() -> None:
    m = parsed(build_oru(make_alert(revision=2), DEST))
    assert m.oru_r01_patient_result.oru_r01_order_observation.obr.obr_25.to_er7() == "C"
    assert {o.obx_11.to_er7() for o in observations(m)} == {"C"}


def test_delimiters_in_text_are_escaped() -> None:
    alert = make_alert(
        reasons=[NASTY],
        accession_number="ACC|1^2",
        patient_name="O'Brien&Co^Ann~Marie",
        patient_id="ID^1",
        issuer_of_patient_id="HOSP&X",
        note=NASTY,
    )
    er7 = build_oru(alert, DEST.model_copy(update={"sending_facility": "RAD|IO"}))
    plain = make_alert(reasons=["x"])
    assert len(er7.split("\r")) == len(build_oru(plain, DEST).split("\r"))  # no extra segment
    m = parsed(er7)
    expected = NASTY.replace("\r\n", "  ")  # control characters become spaces
    obx = obx_by_code(m)
    assert value(obx["TRIAGEREASON"][0]) == expected
    assert value(obx["NOTE"][0]) == expected
    assert "\\F\\" in er7 and "\\E\\F\\E\\" in er7  # a literal escape sequence stays literal
    pid = m.oru_r01_patient_result.oru_r01_patient.pid
    assert unescape(pid.pid_3.cx_1.to_er7()) == "ID^1"
    assert unescape(pid.pid_3.cx_4.to_er7()) == "HOSP&X"
    assert unescape(pid.pid_5.xpn_1.to_er7()) == "O'Brien&Co"
    assert unescape(pid.pid_5.xpn_2.to_er7()) == "Ann~Marie"
    obr = m.oru_r01_patient_result.oru_r01_order_observation.obr
    assert unescape(obr.obr_3.to_er7()) == "ACC|1^2"
    assert unescape(m.msh.msh_4.to_er7()) == "RAD|IO"


def test_long_values_fit_hl7_lengths() -> None:
    reason = " ".join(f"word{i}|x" for i in range(120))  # ~1000 characters, escaped to ~1300
    alert = make_alert(reasons=[reason], note="n" * 500, issuer_of_patient_id="A" * 40, patient_name="X" * 300 + "^Y")
    m = parsed(build_oru(alert, DEST))
    obx = obx_by_code(m)
    assert value(obx["TRIAGEREASON"][0]) == reason  # TX: repetitions (lines), nothing lost
    assert len(obx["TRIAGEREASON"][0].obx_5) > 1
    assert value(obx["NOTE"][0]).replace(" ", "") == "n" * 500
    pid = m.oru_r01_patient_result.oru_r01_patient.pid
    assert pid.pid_3.cx_4.to_er7() == "&" + "A" * 40 + "&L"  # too long for HD-1 (IS): a local universal id
    assert len(pid.pid_5.xpn_1.to_er7()) == 199  # ST: shortened
    with pytest.raises(AlertError, match="sending_facility") as err:
        build_oru(alert, DEST.model_copy(update={"sending_facility": "F" * 21}))
    assert not err.value.retryable
    with pytest.raises(AlertError, match="control id"):
        build_oru(alert, DEST, control_id="C" * 200)


def test_non_ascii_name_declares_utf8() -> None:
    er7 = build_oru(make_alert(patient_name="Müller^Zoë"), DEST)
    m = parsed(er7)
    assert m.msh.msh_18.to_er7() == "UNICODE UTF-8"
    assert m.oru_r01_patient_result.oru_r01_patient.pid.pid_5.to_er7() == "Müller^Zoë"
    assert "UNICODE" not in build_oru(make_alert(), DEST)


def test_operations_doc_shows_the_message_the_code_builds() -> None:
    doc = (REPO_ROOT / "docs" / "operations.md").read_text()
    example = build_oru(make_alert(), DEST).replace("\r", "\n")
    assert f"```\n{example}\n```" in doc, "regenerate the HL7 example in docs/operations.md from build_oru"


def test_parse_ack_older_versions_and_lf() -> None:
    ack = parse_ack(
        "MSH|^~\\&|RIS|H|CXRNODE|R|20261202||ACK|9|P|2.3\nMSA|AE|ctl-1|db \\F\\ down\n"
        "ERR|OBX^5^1^102&Data type error&HL70357\n"
    )
    assert (ack.code, ack.control_id) == ("AE", "ctl-1")
    assert "db | down" in ack.text and "Data type error" in ack.text
    with pytest.raises(ValueError):
        parse_ack("HELLO")


# --- delivery over MLLP ----------------------------------------------------------------------------


def test_accepted_returns_receipt(ris: MLLPListener) -> None:
    alert = make_alert(patient_name="Müller^Zoë")
    dest = ris.destination()
    assert deliver(dest, alert) == f"ACK AA {alert.alert_id}"
    (received,) = ris.wait_for_messages(1)
    assert received == build_oru(alert, dest)  # the exact bytes, UTF-8
    assert parsed(received).msh.msh_10.to_er7() == alert.alert_id


def test_application_error_is_retryable_with_reason(ris: MLLPListener) -> None:
    ris.set_ack("AE", text="database unavailable | try later")
    with pytest.raises(AlertError) as err:
        deliver(ris.destination(), make_alert())
    assert err.value.retryable
    assert "AE" in err.value.reason and "database unavailable | try later" in err.value.reason


def test_reject_is_not_retryable(ris: MLLPListener) -> None:
    ris.set_ack("AR", text="unknown receiving application")
    with pytest.raises(AlertError) as err:
        deliver(ris.destination(), make_alert())
    assert not err.value.retryable
    assert "AR" in err.value.reason and "rejected" in err.value.reason
    assert "unknown receiving application" in err.value.reason


def test_nak_then_accept_sends_the_same_message(ris: MLLPListener) -> None:
    alert, dest = make_alert(), ris.destination()
    ris.set_ack("AE", text="busy")
    with pytest.raises(AlertError):
        deliver(dest, alert)
    ris.set_ack("AA")
    assert deliver(dest, alert) == f"ACK AA {alert.alert_id}"
    first, second = ris.wait_for_messages(2)
    assert first == second  # a retry is the same message with the same control id


def test_listener_down_fails_fast_then_up_delivers(ris: MLLPListener) -> None:
    dest, alert = ris.destination(timeout_s=5), make_alert()
    ris.stop()
    started = time.monotonic()
    with pytest.raises(AlertError, match="refused") as err:
        deliver(dest, alert)
    assert err.value.retryable
    assert time.monotonic() - started < 2
    ris.start()
    assert ris.port == dest.port
    assert deliver(dest, alert) == f"ACK AA {alert.alert_id}"
    assert len(ris.wait_for_messages(1)) == 1


def test_nothing_listening_is_retryable() -> None:
    dest = HL7Destination(type="hl7", name="ris", host="127.0.0.1", port=free_port(), timeout_s=5)
    started = time.monotonic()
    with pytest.raises(AlertError) as err:
        deliver(dest, make_alert())
    assert err.value.retryable and time.monotonic() - started < 2


def test_no_ack_times_out(ris: MLLPListener) -> None:
    ris.set_ack("none")
    started = time.monotonic()
    with pytest.raises(AlertError, match="no ACK") as err:
        deliver(ris.destination(timeout_s=1.0), make_alert())
    elapsed = time.monotonic() - started
    assert err.value.retryable
    assert 0.9 <= elapsed < 4, elapsed
    assert len(ris.wait_for_messages(1)) == 1  # it was received, just never answered


@pytest.mark.parametrize(
    ("mode", "reason"), [("close", "without an ACK"), ("garbage", "garbled ACK"), ("wrongid", "SOMEONE-ELSE")]
)
def test_bad_answers_are_retryable(ris: MLLPListener, mode: str, reason: str) -> None:
    ris.set_ack(mode)
    with pytest.raises(AlertError, match=reason) as err:
        deliver(ris.destination(timeout_s=3), make_alert())
    assert err.value.retryable


# --- TLS -----------------------------------------------------------------------------------------------


@pytest.fixture
def tls_ris(tmp_path: Path) -> Iterator[tuple[MLLPListener, Path]]:
    key, cert = self_signed(tmp_path, "ris", common_name="127.0.0.1")
    with MLLPListener(tmp_path / "ris-tls", tls_cert=cert, tls_key=key) as listener:
        yield listener, cert


def test_mllp_over_tls(tls_ris: tuple[MLLPListener, Path]) -> None:
    ris, cert = tls_ris
    dest, alert = ris.destination(tls=True, timeout_s=5), make_alert()
    assert deliver(dest, alert, ssl_context=client_ssl_context(ca_file=cert)) == f"ACK AA {alert.alert_id}"
    assert len(ris.wait_for_messages(1)) == 1
    with pytest.raises(AlertError, match="TLS handshake") as err:  # the system CAs do not trust it
        deliver(dest, alert, ssl_context=client_ssl_context())
    assert not err.value.retryable
    with pytest.raises(AlertError, match="needs TLS") as err:
        deliver(dest, alert)
    assert not err.value.retryable
