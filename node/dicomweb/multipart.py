"""Reading a STOW-RS request body (multipart/related) part by part into spool files, never whole in memory.

Every part is written as it arrives to a temporary file in ``spool/.incoming`` (the same filesystem as the
spool, so accepting it is a rename), through :class:`node.ingest.guard.CappedFile`: a part larger than
``storage.max_instance_mb`` is emptied and the rest of it dropped, exactly as a C-STORE data set is. The
body as a whole is held to a limit too; past it :class:`BodyTooLarge` is raised at once, while streaming.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

from node.ingest.guard import CappedFile

log = logging.getLogger(__name__)

DICOM = "application/dicom"


class MalformedBody(ValueError):
    """The body is not the multipart/related it says it is (400)."""


class UnsupportedMediaType(ValueError):
    """A media type STOW-RS here does not take (415)."""


class BodyTooLarge(ValueError):
    """The body passed the request limit (413)."""


@dataclass(frozen=True)
class MediaType:
    kind: str  # "multipart/related", lower case
    params: dict[str, str]


_PARAM = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


def parse_media_type(value: str) -> MediaType:
    """`type/subtype; a=b; c="d"` -> MediaType (names lower case, quotes removed)."""
    kind, _, rest = value.partition(";")
    params = {}
    for name, raw in _PARAM.findall(";" + rest):
        params[name.lower()] = raw[1:-1].replace('\\"', '"') if raw.startswith('"') else raw
    return MediaType(kind.strip().lower(), params)


def stow_boundary(content_type: str) -> bytes:
    """The boundary of a STOW-RS request, or why it is not one: UnsupportedMediaType when the media type is
    not multipart/related of application/dicom, MalformedBody when the multipart has no boundary."""
    if not content_type.strip():
        raise UnsupportedMediaType('no Content-Type: STOW-RS takes multipart/related; type="application/dicom"')
    mt = parse_media_type(content_type)
    if mt.kind != "multipart/related":
        raise UnsupportedMediaType(f'Content-Type {mt.kind}: STOW-RS takes multipart/related; type="application/dicom"')
    part_type = mt.params.get("type", DICOM).strip().lower()
    if part_type != DICOM:
        raise UnsupportedMediaType(
            f"multipart/related of {part_type}: only {DICOM} instances are accepted "
            "(no DICOM JSON/XML metadata with bulk data)"
        )
    boundary = mt.params.get("boundary", "")
    if not boundary or len(boundary) > 70:
        raise MalformedBody("multipart/related without a valid boundary parameter")
    return boundary.encode("latin-1", "replace")


@dataclass
class Part:
    """One received part: its file in spool/.incoming and what its headers said."""

    path: Path
    content_type: str
    file: CappedFile
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def received(self) -> int:
        return self.file.received

    @property
    def is_dicom(self) -> bool:
        return parse_media_type(self.content_type).kind in (DICOM, "")


class PartSpooler:
    """Feed it the body chunk by chunk (`write`), then `finish()`; it leaves one spool file per part.

    On any error the caller calls `discard()`: every file it made is removed (nothing half-stored).
    """

    def __init__(
        self, boundary: bytes, incoming: Path, *, max_part_bytes: int, max_body_bytes: int, max_parts: int = 1000
    ) -> None:
        self.incoming = incoming
        self.max_parts = max_parts
        self.max_part_bytes = max_part_bytes
        self.max_body_bytes = max_body_bytes
        self.parts: list[Part] = []
        self.body_bytes = 0
        self._ended = False
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, str] = {}
        self._current: Part | None = None
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": self._on_field,
                "on_header_value": self._on_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_done,
                "on_part_data": self._data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
        )

    def write(self, chunk: bytes) -> None:
        self.body_bytes += len(chunk)
        if self.body_bytes > self.max_body_bytes:
            raise BodyTooLarge(
                f"request body passed {self.max_body_bytes} bytes (dicomweb.max_request_mb): "
                "not read further, nothing of it kept"
            )
        if self._ended:
            return  # an epilogue after the closing boundary: ignored, as RFC 2046 says
        try:
            self._parser.write(chunk)
        except MultipartParseError as e:
            raise MalformedBody(f"body is not valid multipart/related: {e}") from e

    def finish(self) -> list[Part]:
        """The parts, once the closing boundary was seen; MalformedBody when the body ended early or had none."""
        if not self._ended:
            raise MalformedBody(
                "body ended before the closing multipart boundary"
                if self.body_bytes
                else "empty body: no multipart/related parts"
            )
        if not self.parts:
            raise MalformedBody("multipart/related body without any part")
        return self.parts

    def discard(self) -> None:
        if self._current is not None:
            self._close(self._current)
        for part in self.parts:
            part.path.unlink(missing_ok=True)
        self.parts = []

    # -- parser callbacks -----------------------------------------------------------------------------

    def _begin(self) -> None:
        self._headers = {}

    def _on_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _on_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _headers_done(self) -> None:
        if len(self.parts) >= self.max_parts:
            raise BodyTooLarge(
                f"more than {self.max_parts} parts in one request (dicomweb.max_parts): not read "
                "further, nothing of it kept"
            )
        # Closed by the part's CappedFile once the part is complete: it outlives this call.
        f: IO[bytes] = tempfile.NamedTemporaryFile(dir=self.incoming, prefix="stow-", suffix=".part", delete=False)  # noqa: SIM115
        part = Part(
            Path(f.name), self._headers.get("content-type", ""), CappedFile(f, self.max_part_bytes), self._headers
        )
        self.parts.append(part)
        self._current = part

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None:
            self._current.file.write(data[start:end])

    def _part_end(self) -> None:
        if self._current is not None:
            self._close(self._current)
            self._current = None

    def _end(self) -> None:
        self._ended = True

    @staticmethod
    def _close(part: Part) -> None:
        f: Any = part.file
        try:
            f.flush()
        finally:
            f.close()
