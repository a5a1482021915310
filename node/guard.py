"""Defences of the DICOM listener against peers that would exhaust it (issue 13).

pynetdicom trusts its peer: it writes a C-STORE data set to disk however long it is, buffers a PDU of
whatever length the peer declares, and keeps a half-open connection for as long as the peer drips
bytes. A node in front of PACS must go on receiving from every legitimate modality whatever one bad
peer sends, so the listener's connections are made here, with bounds pynetdicom lacks:

- the bytes of one C-STORE data set kept on disk are capped (``storage.max_instance_mb``): beyond the
  cap the file is emptied and the rest of the data set is read and dropped, so the peer still gets a
  C-STORE failure status for it (see :class:`SizeCappedDIMSE`).

One :class:`GuardedRequestHandler` per connection is what the SCP's server class instantiates
(``request_handler=``); everything else stays pynetdicom's.
"""

from __future__ import annotations

import logging
from typing import IO, Any

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import RequestHandler

log = logging.getLogger(__name__)


class CappedFile:
    """Stands in for the temporary file pynetdicom writes a received data set to: counts every byte,
    keeps at most `limit`; past it the file is emptied and the rest dropped (`exceeded`)."""

    def __init__(self, f: IO[bytes], limit: int) -> None:
        self._f = f
        self.limit = limit
        self.received = f.tell()
        self.exceeded = False

    def write(self, data: bytes) -> int:
        self.received += len(data)
        if self.exceeded:
            return len(data)
        if self.received > self.limit:
            self.exceeded = True
            self._f.seek(0)
            self._f.truncate()
            log.warning("data set in %s passed %d bytes: emptied, the rest is dropped", self._f.name, self.limit)
            return len(data)
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:  # name, file, close … of the NamedTemporaryFile
        return getattr(self._f, name)


def received_bytes(request: object) -> int | None:
    """Bytes the peer sent for a C-STORE data set (kept or not), when it was received under the cap."""
    f = getattr(request, "_dataset_file", None)
    return f.received if isinstance(f, CappedFile) else None


class SizeCappedDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with the data set file of an incoming C-STORE wrapped in a
    :class:`CappedFile`, as soon as the message that creates it has been decoded."""

    def __init__(self, assoc: Any, max_bytes: int) -> None:
        super().__init__(assoc)
        self.max_bytes = max_bytes

    def receive_primitive(self, primitive: P_DATA) -> None:
        self._cap()
        super().receive_primitive(primitive)
        self._cap()  # the message's file was created in this call: one PDU (<= max_pdu) at most was written

    def _cap(self) -> None:
        message = self.message
        f = getattr(message, "_data_set_file", None) if message is not None else None
        if f is not None and not isinstance(f, CappedFile):
            capped = CappedFile(f, self.max_bytes)
            if capped.received > self.max_bytes:
                capped.write(b"")
            message._data_set_file = capped  # type: ignore[union-attr]


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's connection handler with the node's bounds installed on each new association."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        max_bytes = getattr(self.server, "max_instance_bytes", None)
        if max_bytes:
            assoc.dimse = SizeCappedDIMSE(assoc, max_bytes)
        return assoc
