"""Triage alerts as HL7 v2.5.1 ORU^R01 over MLLP, for RIS endpoints that take results the HL7 way.

Why this shape:

* The message is built and validated with hl7apy (STRICT, against the 2.5.1 ORU_R01 structure), not
  assembled by hand: segment order, required fields and escaping are the library's, so a receiver's
  parser sees what the standard says.
* :func:`build_oru` is a pure function of the alert (MSH-7 is the alert's ``created_at``, MSH-10 its
  ``alert_id``), so a retry sends byte-for-byte the same message with the same control id, and a
  receiver that has already filed it can recognise the duplicate.
* Every text value goes through one place (``_fit``/``_er7``): control characters become spaces, the
  escape character is escaped first and hl7apy escapes the delimiters (``| ^ & ~``), so reasons,
  names and notes can never break the message structure. Values are kept within hl7apy's (HL7's)
  lengths: long TX text becomes repetitions (lines), other text is shortened; a configured MSH name
  over 20 characters (IS) is a configuration error.
* :func:`deliver` opens a connection, sends one MLLP frame and waits for the ACK under one deadline
  (``dest.timeout_s``) that bounds connect, TLS handshake, send and every read: it never hangs.

How an answer maps to :class:`~node.alerts.message.AlertError`:

* ``AA``/``CA`` (accepted): delivered, a receipt ``"ACK AA <control id>"`` is returned.
* ``AE``/``CE`` (application error): ``retryable=True``. The receiver could not process the message
  now (its database down, an interface busy); the alert is retried up to the attempt budget and then
  goes to the dead letter with the receiver's reason.
* ``AR``/``CR`` (rejected): ``retryable=False``. The receiver refuses this message (unknown
  application, unsupported type or version); sending it again changes nothing, so it goes to the dead
  letter at once (an operator can still ``cxrnode alerts retry`` it after fixing the receiver).
* Connection refused, timeout, connection closed without an ACK, a garbled ACK or an ACK for another
  control id: ``retryable=True``, with the reason.
* Configuration errors (``dest.tls`` without a TLS context) and an untrusted TLS certificate:
  ``retryable=False`` (nothing will change until an administrator acts).

Observation identifiers (OBX-3) are DICOM (``DCM``), SNOMED CT (``SCT``) where a concept exists, and
local codes (coding system ``99CXR``, HL7 table 0396's "local" form) otherwise; docs/operations.md
lists them with an example message.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from hl7apy.base_datatypes import ST
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Group, Message, Segment
from hl7apy.exceptions import HL7apyException

from node.alerts.message import AlertError, TriageAlert
from node.runtime.config import HL7Destination

log = logging.getLogger(__name__)

VERSION = "2.5.1"
LOCAL = "99CXR"  # local coding system (HL7 table 0396 "99zzz")
START_BLOCK, END_BLOCK, CARRIAGE_RETURN = b"\x0b", b"\x1c", b"\x0d"
MAX_ACK_BYTES = 1 << 20  # a larger answer is not an ACK
ST_MAX, IS_MAX = 199, 20  # hl7apy's (and HL7's) maximum lengths of ST and IS values

# OBX-3 observation identifiers: (code, text, coding system).
Code = tuple[str, str, str]
OBS_STUDY_UID: Code = ("110180", "Study Instance UID", "DCM")
OBS_TRIAGE_LEVEL: Code = ("TRIAGE", "Triage level", LOCAL)
OBS_REASON: Code = ("TRIAGEREASON", "Triage reason", LOCAL)
OBS_SEVERITY: Code = ("SEVERITY", "Lung opacity severity score (0-6 zones)", LOCAL)
OBS_SEVERITY_CHANGE: Code = ("SEVERITYCHANGE", "Severity change against prior", LOCAL)
OBS_PRIOR_STUDY: Code = ("PRIORSTUDYUID", "Prior study instance UID", LOCAL)
OBS_PRIOR_DATE: Code = ("PRIORSTUDYDATE", "Prior study date", LOCAL)
OBS_PRIOR_SEVERITY: Code = ("PRIORSEVERITY", "Prior severity score (0-6 zones)", LOCAL)
OBS_PNEUMOTHORAX: Code = ("36118008", "Pneumothorax", "SCT")
OBS_PNEUMOTHORAX_SIDE: Code = ("PTXSIDE", "Pneumothorax laterality", LOCAL)
OBS_PNEUMOTHORAX_PROBABILITY: Code = ("PTXPROB", "Pneumothorax probability", LOCAL)
OBS_MODEL: Code = ("AIMODEL", "AI model version", LOCAL)
OBS_NOTE: Code = ("NOTE", "Not for diagnostic use", LOCAL)
SERVICE: Code = ("CXRTRIAGE", "Chest X-ray AI triage", LOCAL)

LEVEL_CODES: dict[str, Code] = {
    "critical": ("critical", "Critical", LOCAL),
    "urgent": ("urgent", "Urgent", LOCAL),
    "routine": ("routine", "Routine", LOCAL),
}
LEVEL_FLAGS = {"critical": "AA", "urgent": "A", "routine": "N"}  # OBX-8, HL7 table 0078
PRESENT: Code = ("52101004", "Present", "SCT")
ABSENT: Code = ("2667000", "Absent", "SCT")
SIDES: dict[str, Code] = {
    "right": ("24028007", "Right", "SCT"),
    "left": ("7771000", "Left", "SCT"),
    "both": ("51440002", "Right and left", "SCT"),
}
ZONES_UNIT: Code = ("{zones}", "lung zones", "UCUM")

ACCEPTED = {"AA", "CA"}
APPLICATION_ERROR = {"AE", "CE"}
REJECTED = {"AR", "CR"}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# --- building --------------------------------------------------------------------------------------


def _clean(value: object) -> str:
    return _CONTROL.sub(" ", str(value))


def _er7(raw: str) -> str:
    """hl7apy's escaping of one text component, the escape character escaped first.

    hl7apy escapes the delimiters itself but leaves an existing escape sequence (say a literal ``\\F\\``
    in a reason) alone; escaping every backslash first makes the text mean exactly what it says.
    """
    return str(ST(raw.replace("\\", "\\E\\"), validation_level=VALIDATION_LEVEL.TOLERANT).to_er7())


def _fit(value: object, limit: int = ST_MAX) -> str:
    """The text without control characters, shortened so that its escaped form fits ``limit``."""
    raw = _clean(value)
    excess = len(_er7(raw)) - limit
    if excess > 0:
        log.warning("HL7 text value of %d characters shortened to fit %d (escaped)", len(raw), limit)
        while excess > 0:
            raw = raw[: len(raw) - max(1, excess // 3)]
            excess = len(_er7(raw)) - limit
    return raw


def _text(value: object, limit: int = ST_MAX) -> str:
    """A value for a leaf assignment (hl7apy escapes the delimiters when it writes ER7)."""
    return _fit(value, limit).replace("\\", "\\E\\")


def _escaped(value: object, limit: int = ST_MAX) -> str:
    """The ER7 form of one component, for values assigned as a whole field (hl7apy parses those)."""
    return _er7(_fit(value, limit))


def _lines(value: object) -> list[str]:
    """Long TX text as repetitions (HL7: a repetition of TX is a new line), each fitting one component."""
    raw = _clean(value)
    if len(_er7(raw)) <= ST_MAX:
        return [_er7(raw)]
    for width in (ST_MAX, 120, 66):  # escaping at most triples a character: 66 always fits
        lines = textwrap.wrap(raw, width=width, break_long_words=True, break_on_hyphens=False) or [""]
        if all(len(_er7(line)) <= ST_MAX for line in lines):
            return [_er7(line) for line in lines]
    raise AssertionError("unreachable: 66 characters escape to at most 198")


def _is(value: str, what: str) -> str:
    """An IS value (HD namespace id): at most 20 characters, or a configuration error naming the key."""
    raw = _clean(value)
    if len(_er7(raw)) > IS_MAX:
        raise AlertError(f"{what} {value!r} is longer than {IS_MAX} characters (HL7 IS)", retryable=False)
    return raw.replace("\\", "\\E\\")


def _ts(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def _created(alert: TriageAlert) -> str:
    """``created_at`` (ISO 8601) as an HL7 TS; now when it cannot be read."""
    try:
        dt = datetime.fromisoformat(alert.created_at.replace("Z", "+00:00"))
    except ValueError:
        log.warning("alert %s: created_at %r is not ISO 8601; using now", alert.alert_id, alert.created_at)
        dt = datetime.now(UTC)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return _ts(dt)


def _da(value: str) -> str:
    """A DICOM DA as HL7 DT, "" when it is not one."""
    value = value.strip()
    return value if re.fullmatch(r"\d{8}", value) else ""


def _study_datetime(alert: TriageAlert) -> str:
    date = _da(alert.study_date)
    if not date:
        return ""
    digits = re.match(r"\d{2,6}", alert.study_time.strip())
    time_part = digits.group(0) if digits and len(digits.group(0)) % 2 == 0 else ""
    return date + time_part


def _number(value: float | int) -> str:
    if isinstance(value, bool):
        raise TypeError("a number, not a bool")
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}".rstrip("0").rstrip(".") or "0"


@dataclass(frozen=True)
class _Obs:
    code: Code
    value_type: str  # OBX-2
    value: Sequence[str]  # components of OBX-5, unescaped
    sub_id: str = ""
    units: Code | None = None
    range: str = ""
    flag: str = ""


def _observations(alert: TriageAlert) -> list[_Obs]:
    obs: list[_Obs] = [_Obs(OBS_STUDY_UID, "ST", [alert.study_instance_uid])]
    level = LEVEL_CODES.get(alert.level)
    if level is None:
        raise AlertError(f"unknown triage level {alert.level!r}", retryable=False)
    obs.append(_Obs(OBS_TRIAGE_LEVEL, "CWE", level, flag=LEVEL_FLAGS[alert.level]))
    for i, reason in enumerate(alert.reasons, 1):
        obs.append(_Obs(OBS_REASON, "TX", [reason], sub_id=str(i)))
    if alert.severity_score is not None:
        obs.append(_Obs(OBS_SEVERITY, "NM", [_number(alert.severity_score)], units=ZONES_UNIT, range="0-6"))
    if alert.prior is not None:
        if alert.severity_change is not None:
            obs.append(_Obs(OBS_SEVERITY_CHANGE, "NM", [_number(alert.severity_change)], units=ZONES_UNIT))
        obs.append(_Obs(OBS_PRIOR_STUDY, "ST", [alert.prior.study_instance_uid]))
        if _da(alert.prior.study_date):
            obs.append(_Obs(OBS_PRIOR_DATE, "DT", [_da(alert.prior.study_date)]))
        if alert.prior.severity_score is not None:
            obs.append(
                _Obs(OBS_PRIOR_SEVERITY, "NM", [_number(alert.prior.severity_score)], units=ZONES_UNIT, range="0-6")
            )
    if alert.pneumothorax_present is not None:
        obs.append(
            _Obs(
                OBS_PNEUMOTHORAX,
                "CWE",
                PRESENT if alert.pneumothorax_present else ABSENT,
                flag="A" if alert.pneumothorax_present else "N",
            )
        )
    side = SIDES.get((alert.pneumothorax_side or "").lower())
    if side is not None:
        obs.append(_Obs(OBS_PNEUMOTHORAX_SIDE, "CWE", side))
    if alert.pneumothorax_probability is not None:
        obs.append(_Obs(OBS_PNEUMOTHORAX_PROBABILITY, "NM", [_number(alert.pneumothorax_probability)], range="0-1"))
    for i, model in enumerate(alert.models, 1):
        obs.append(_Obs(OBS_MODEL, "ST", [f"{model.name} {model.version} ({model.status})"], sub_id=str(i)))
    if alert.note:
        obs.append(_Obs(OBS_NOTE, "TX", [alert.note]))
    return obs


def _set_code(element: object, code: Code, prefix: str) -> None:
    for i, part in enumerate(code, 1):
        setattr(element, f"{prefix}_{i}", _text(part))


def _msh(msg: Message, alert: TriageAlert, dest: HL7Destination, control_id: str) -> None:
    msh = msg.msh
    for hd, key in (
        (msh.msh_3, "sending_application"),
        (msh.msh_4, "sending_facility"),
        (msh.msh_5, "receiving_application"),
        (msh.msh_6, "receiving_facility"),
    ):
        configured = getattr(dest, key)
        if configured:
            hd.hd_1 = _is(configured, f"HL7 destination {dest.name}: {key}")
    msh.msh_7.ts_1 = _created(alert)
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = _er7(control_id)
    msh.msh_11.pt_1 = "P"
    msh.msh_12.vid_1 = VERSION


def _pid(patient: Group, alert: TriageAlert) -> None:
    pid = patient.add_segment("PID")
    pid.pid_1 = "1"
    if not alert.patient_id:
        log.warning("alert %s: no patient id; PID-3 says UNKNOWN", alert.alert_id)
    pid.pid_3.cx_1 = _text(alert.patient_id or "UNKNOWN")
    issuer = alert.issuer_of_patient_id.strip()
    if issuer and len(_er7(_clean(issuer))) <= IS_MAX:
        pid.pid_3.cx_4.hd_1 = _text(issuer)
    elif issuer:  # DICOM allows 64 characters, HD-1 (IS) 20: a longer issuer is a local universal id
        pid.pid_3.cx_4.hd_2 = _text(issuer)
        pid.pid_3.cx_4.hd_3 = "L"
    pid.pid_3.cx_5 = "MR"
    # DICOM PN family^given^middle^prefix^suffix (first, alphabetic group) -> XPN family^given^middle^suffix^prefix
    parts = (alert.patient_name.split("=")[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    pid.pid_5.xpn_1.fn_1 = _text(family or "UNKNOWN")
    for name, part in (("xpn_2", given), ("xpn_3", middle), ("xpn_4", suffix), ("xpn_5", prefix)):
        if part:
            setattr(pid.pid_5, name, _text(part))
    if _da(alert.patient_birth_date):
        pid.pid_7.ts_1 = _da(alert.patient_birth_date)
    pid.pid_8 = alert.patient_sex if alert.patient_sex in ("M", "F", "O") else "U"


def _order(order: Group, alert: TriageAlert, status: str) -> None:
    orc = order.add_segment("ORC")
    orc.orc_1 = "RE"  # observations to follow
    obr = order.add_segment("OBR")
    obr.obr_1 = "1"
    if alert.accession_number:
        for seg, placer, filler in ((orc, "orc_2", "orc_3"), (obr, "obr_2", "obr_3")):
            getattr(seg, placer).ei_1 = _text(alert.accession_number)
            getattr(seg, filler).ei_1 = _text(alert.accession_number)
    orc.orc_5 = "CM"  # order completed
    _set_code(obr.obr_4, SERVICE, "ce")
    observed = _study_datetime(alert) or _created(alert)
    obr.obr_7.ts_1 = observed
    obr.obr_22.ts_1 = _created(alert)
    obr.obr_24 = "RAD"
    obr.obr_25 = status


def _obx(order: Group, set_id: int, ob: _Obs, status: str, observed: str) -> None:
    obx: Segment = order.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
    obx.obx_1 = str(set_id)
    obx.obx_2 = ob.value_type
    _set_code(obx.obx_3, ob.code, "ce")
    if ob.sub_id:
        obx.obx_4 = ob.sub_id
    # OBX-5 is of type "varies" for hl7apy: it takes an ER7 string, so each component is escaped here.
    if ob.value_type == "TX":
        for line in _lines(ob.value[0]):
            obx.add_field("OBX_5").value = line
    else:
        obx.obx_5 = "^".join(_escaped(part) for part in ob.value)
    if ob.units is not None:
        _set_code(obx.obx_6, ob.units, "ce")
    if ob.range:
        obx.obx_7 = ob.range
    if ob.flag:
        obx.obx_8 = ob.flag
    obx.obx_11 = status
    obx.obx_14.ts_1 = observed


def build_oru(alert: TriageAlert, dest: HL7Destination, *, control_id: str | None = None) -> str:
    """The alert as an ER7 ORU^R01 (segments separated by CR), validated against HL7 v2.5.1.

    ``control_id`` (MSH-10) defaults to ``alert.alert_id`` (note: HL7 2.5.1 gives MSH-10 20 characters;
    a 32-character uuid hex is accepted by the common engines, pass a shorter id for a strict receiver).
    Revision > 1 (a late image updated the result) sends result status ``C`` (corrected) in OBR-25 and
    every OBX-11, with the same placer/filler order numbers so the receiver replaces the first result.
    Raises :class:`AlertError` (not retryable) when the alert cannot make a valid message.
    """
    control = control_id or alert.alert_id
    if not control or len(_er7(_clean(control))) > ST_MAX or _clean(control) != control:
        raise AlertError(
            f"HL7 message control id {control!r} is empty, longer than {ST_MAX} characters or has control characters",
            retryable=False,
        )
    status = "C" if alert.revision > 1 else "F"
    level = VALIDATION_LEVEL.STRICT
    try:
        msg = Message("ORU_R01", version=VERSION, validation_level=level)
        _msh(msg, alert, dest, control)
        result = msg.add_group("ORU_R01_PATIENT_RESULT")
        _pid(result.add_group("ORU_R01_PATIENT"), alert)
        order = result.add_group("ORU_R01_ORDER_OBSERVATION")
        _order(order, alert, status)
        created = _created(alert)
        for set_id, ob in enumerate(_observations(alert), 1):
            _obx(order, set_id, ob, status, created)
        if not msg.to_er7().isascii():  # non-ASCII text (a name): say that the bytes on the wire are UTF-8
            msg.msh.msh_18 = "UNICODE UTF-8"
        msg.validate()
        return str(msg.to_er7())
    except HL7apyException as e:
        raise AlertError(f"HL7 ORU^R01 for alert {alert.alert_id} is not valid v2.5.1: {e}", retryable=False) from e


# --- reading answers -------------------------------------------------------------------------------


def unescape(value: str, escape: str = "\\") -> str:
    r"""Undo HL7 escaping in one component: ``\F\ \S\ \T\ \R\ \E\`` and ``\Xhh..\``; others dropped."""
    if escape not in value:
        return value
    table = {"F": "|", "S": "^", "T": "&", "R": "~", "E": escape}
    out: list[str] = []
    i = 0
    while i < len(value):
        if value[i] == escape:
            end = value.find(escape, i + 1)
            if end > i:
                seq = value[i + 1 : end]
                if seq in table:
                    out.append(table[seq])
                elif seq.startswith("X") and re.fullmatch(r"X(?:[0-9A-Fa-f]{2})+", seq):
                    out.append(bytes.fromhex(seq[1:]).decode("utf-8", "replace"))
                elif seq == ".br":
                    out.append("\n")
                i = end + 1
                continue
        out.append(value[i])
        i += 1
    return "".join(out)


@dataclass(frozen=True)
class Ack:
    """What an ACK says: MSA-1 code, MSA-2 control id, and the receiver's text (MSA-3 and ERR)."""

    code: str
    control_id: str
    text: str


def parse_ack(raw: str) -> Ack:
    """Read an ACK leniently (any v2 version, CR or LF between segments); ValueError when it is none."""
    segments = [s for s in re.split(r"\r\n|\r|\n", raw.strip()) if s]
    if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 8:
        raise ValueError("no MSH segment")
    msh = segments[0]
    field_sep = msh[3]
    encoding = (msh[4:8] + "^~\\&")[:4]  # component, repetition, escape, subcomponent
    comp_sep, rep_sep, escape, sub_sep = encoding[0], encoding[1], encoding[2], encoding[3]

    def fields(segment: str) -> list[str]:
        return segment.split(field_sep)

    def text(value: str) -> str:
        parts = []
        for rep in value.split(rep_sep):
            comps = [unescape(c.replace(sub_sep, " "), escape) for c in rep.split(comp_sep)]
            parts.append(" ".join(c for c in comps if c))
        return "; ".join(p for p in parts if p)

    msa = next((fields(s) for s in segments if s[:3] == "MSA"), None)
    if msa is None or len(msa) < 2 or not msa[1]:
        raise ValueError("no MSA segment with an acknowledgment code")
    code = msa[1].strip().upper()
    control = unescape(msa[2], escape).strip() if len(msa) > 2 else ""
    notes: list[str] = []
    if len(msa) > 3 and msa[3]:
        notes.append(text(msa[3]))
    for seg in segments:
        if seg[:3] != "ERR":
            continue
        err = fields(seg)
        # v2.5+: ERR-3 HL7 error code (CWE: code^text), ERR-7 diagnostic, ERR-8 user message;
        # v2.3/2.4: ERR-1 error code and location.
        for index in (8, 7, 3, 1):
            if len(err) > index and err[index]:
                value = text(err[index])
                if value and value not in notes:
                    notes.append(value)
    return Ack(code, control, "; ".join(n for n in notes if n))


# --- delivery --------------------------------------------------------------------------------------


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left


def _read_frame(sock: socket.socket, deadline: _Deadline) -> bytes:
    """Bytes between 0x0B and 0x1C 0x0D; EOFError when the peer closes first."""
    buf = bytearray()
    while True:
        end = buf.find(END_BLOCK + CARRIAGE_RETURN)
        if end >= 0:
            start = buf.find(START_BLOCK)
            return bytes(buf[start + 1 if 0 <= start < end else 0 : end])
        if len(buf) > MAX_ACK_BYTES:
            raise ValueError(f"more than {MAX_ACK_BYTES} bytes without an MLLP end block")
        sock.settimeout(deadline.left())
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError
        buf.extend(chunk)


def _connect(dest: HL7Destination, ssl_context: ssl.SSLContext | None, deadline: _Deadline) -> socket.socket:
    where = f"{dest.host}:{dest.port}"
    try:
        sock = socket.create_connection((dest.host, dest.port), timeout=deadline.left())
    except ConnectionRefusedError as e:
        raise AlertError(f"HL7 {dest.name}: connection to {where} refused (listener down?)") from e
    except TimeoutError as e:
        raise AlertError(f"HL7 {dest.name}: no connection to {where} within {dest.timeout_s:g} s") from e
    except OSError as e:
        raise AlertError(f"HL7 {dest.name}: cannot connect to {where}: {e}") from e
    if ssl_context is None:
        return sock
    try:
        sock.settimeout(deadline.left())
        return ssl_context.wrap_socket(sock, server_hostname=dest.host)
    except ssl.SSLCertVerificationError as e:
        sock.close()
        raise AlertError(
            f"HL7 {dest.name}: TLS handshake with {where} failed: {e.verify_message or e}", retryable=False
        ) from e
    except TimeoutError as e:
        sock.close()
        raise AlertError(f"HL7 {dest.name}: TLS handshake with {where} not done within {dest.timeout_s:g} s") from e
    except (ssl.SSLError, OSError) as e:
        sock.close()
        raise AlertError(f"HL7 {dest.name}: TLS handshake with {where} failed: {e}") from e


def deliver(dest: HL7Destination, alert: TriageAlert, *, ssl_context: ssl.SSLContext | None = None) -> str:
    """Send the alert's ORU^R01 to ``dest`` over MLLP and return a receipt (``"ACK AA <control id>"``).

    TLS is used when ``ssl_context`` is given; ``dest.tls`` without one is a configuration error.
    One deadline of ``dest.timeout_s`` covers connect, TLS handshake, send and waiting for the ACK.
    Raises :class:`AlertError`: ``retryable=False`` for AR/CR (rejected), an invalid message and
    configuration/certificate errors; ``retryable=True`` for AE/CE (application error, retried up to
    the attempt budget), connection refused, timeouts, no ACK, a garbled ACK or one for another message.
    """
    if dest.tls and ssl_context is None:
        raise AlertError(f"HL7 {dest.name} needs TLS but no TLS context is configured", retryable=False)
    control_id = alert.alert_id
    message = build_oru(alert, dest, control_id=control_id)
    frame = START_BLOCK + message.encode("utf-8") + END_BLOCK + CARRIAGE_RETURN
    deadline = _Deadline(dest.timeout_s)
    where = f"{dest.host}:{dest.port}"
    started = time.monotonic()
    sock = _connect(dest, ssl_context, deadline)
    with sock:
        try:
            sock.settimeout(deadline.left())
            sock.sendall(frame)
            raw = _read_frame(sock, deadline)
        except TimeoutError as e:
            raise AlertError(
                f"HL7 {dest.name}: no ACK from {where} within {dest.timeout_s:g} s for {control_id}"
            ) from e
        except EOFError as e:
            raise AlertError(f"HL7 {dest.name}: {where} closed the connection without an ACK for {control_id}") from e
        except ValueError as e:
            raise AlertError(f"HL7 {dest.name}: garbled answer from {where}: {e}") from e
        except OSError as e:
            raise AlertError(f"HL7 {dest.name}: connection to {where} failed before the ACK: {e}") from e
    try:
        ack = parse_ack(raw.decode("utf-8", "replace"))
    except ValueError as e:
        snippet = raw[:80].decode("utf-8", "replace").replace("\r", "\\r")
        raise AlertError(f"HL7 {dest.name}: garbled ACK from {where} ({e}): {snippet!r}") from e
    if ack.control_id != control_id:
        raise AlertError(f"HL7 {dest.name}: ACK from {where} is for control id {ack.control_id!r}, not {control_id!r}")
    elapsed = time.monotonic() - started
    reason = f": {ack.text}" if ack.text else ""
    if ack.code in ACCEPTED:
        log.info("HL7 %s: %s %s from %s in %.3f s", dest.name, ack.code, control_id, where, elapsed)
        return f"ACK {ack.code} {control_id}"
    if ack.code in APPLICATION_ERROR:
        raise AlertError(
            f"HL7 {dest.name}: {where} answered {ack.code} (application error) to {control_id}{reason}", retryable=True
        )
    if ack.code in REJECTED:
        raise AlertError(
            f"HL7 {dest.name}: {where} answered {ack.code} (rejected) to {control_id}{reason}", retryable=False
        )
    raise AlertError(f"HL7 {dest.name}: ACK from {where} has unknown code {ack.code!r}{reason}")
