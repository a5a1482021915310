"""Log set-up for every node process: plain or JSON lines, with patient identifiers redacted.

The node logs about datasets all day (routing decisions, failures, pydicom errors that quote
element values), so redaction is a filter on the handler, applied to every record whatever
module emits it: the message, its arguments, the exception text and any `extra=` fields.

What is redacted:
- `PatientName=…`, `PatientID: …`, `PatientBirthDate …` and the other Patient* identifying
  keywords (also spelled "Patient's Name", "patient_id"), with their value;
- element lines of pydicom dumps for the Patient group, e.g. `(0010,0010) Patient's Name  PN: 'Doe^J'`;
- DICOM person-name values (`Family^Given^…`), wherever they appear;
- dates next to birth/DOB words.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import IO, Any

REDACTED = "[REDACTED]"

# Keywords whose values identify a patient (DICOM keywords and common spellings).
_PHI_KEYS = (
    r"Patient'?s?[ _]?Name|Patient[ _]?ID|Other[ _]?Patient[ _]?IDs|Other[ _]?Patient[ _]?Names|"
    r"Patient'?s?[ _]?Birth[ _]?Date|Patient'?s?[ _]?Birth[ _]?Time|Patient'?s?[ _]?Address|"
    r"Patient'?s?[ _]?Telephone[ _]?Numbers|Patient'?s?[ _]?Mother'?s?[ _]?Birth[ _]?Name|"
    r"Issuer[ _]?of[ _]?Patient[ _]?ID|Responsible[ _]?Person|Referring[ _]?Physician'?s?[ _]?Name|"
    r"Performing[ _]?Physician'?s?[ _]?Name|Operators'?[ _]?Name|Military[ _]?Rank|Medical[ _]?Record[ _]?Locator"
)
# key, separator (=, :, or a VR like "PN:"), then a quoted value or a bare one up to a delimiter.
_KEY_VALUE = re.compile(
    rf"(?P<key>\b(?:{_PHI_KEYS}))(?P<sep>\s*(?:[=:]|\s(?:[A-Z]{{2}}:))\s*)"
    r"(?P<val>'[^']*'|\"[^\"]*\"|\[[^\]]*\]|[^\s,;)}\]]+)",
    re.IGNORECASE,
)
# pydicom dump lines of the Patient group (0010,xxxx): redact everything after the tag's name.
_PATIENT_GROUP_LINE = re.compile(r"(\(0010,\s?[0-9A-Fa-f]{4}\)[^\n:]*:)[^\n]*")
# Person names in DICOM PN form: at least one caret joining name components.
# Components are taken without spaces so surrounding words survive ("from Doe^John at ...").
_PERSON_NAME = re.compile(r"(?<![\w^])[^\W\d_][\w'\-.]{0,63}(?:\^[\w'\-.=]{0,64})+")
_BIRTH_DATE = re.compile(
    r"(?P<key>\b(?:birth[ _-]?date|date[ _-]?of[ _-]?birth|dob|born)\b\W{0,3})"
    r"(?P<val>\d{4}-?\d{2}-?\d{2}|\d{1,2}[./]\d{1,2}[./]\d{2,4})",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """Remove patient identifiers from one log line (idempotent)."""
    if not text:
        return text
    text = _PATIENT_GROUP_LINE.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _KEY_VALUE.sub(lambda m: f"{m.group('key')}{m.group('sep')}{REDACTED}", text)
    text = _BIRTH_DATE.sub(lambda m: f"{m.group('key')}{REDACTED}", text)
    return _PERSON_NAME.sub(REDACTED, text)


# Attributes every LogRecord has; anything else came from `extra=` and goes into JSON output.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class PHIRedactionFilter(logging.Filter):
    """Rewrites each record in place so that no handler or formatter sees the identifiers."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 — a bad format string must not lose the record
            message = f"{record.msg!r} % {record.args!r}"
        record.msg = redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                setattr(record, key, redact(value))
        return True


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, process, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "process": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, ensure_ascii=False)


PLAIN_FORMAT = "%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s"

_HANDLER_NAME = "cxrnode"


def setup_logging(level: str | int = "INFO", json_logs: bool = False, stream: IO[str] | None = None) -> logging.Handler:
    """Configure the root logger once per process (calling again replaces our handler, not others')."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == _HANDLER_NAME:
            root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JSONFormatter() if json_logs else logging.Formatter(PLAIN_FORMAT))
    handler.addFilter(PHIRedactionFilter())
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    # Per-PDU chatter of pynetdicom is not useful at INFO.
    logging.getLogger("pynetdicom").setLevel(max(root.level, logging.WARNING))
    return handler
