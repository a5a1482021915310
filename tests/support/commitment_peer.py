"""A pynetdicom PACS that takes C-STORE and Storage Commitment N-ACTION, and reports as told.

Orthanc answers a commitment within a second, on a new association; this peer lets a test decide
how and when: on the same association, on a new one to the node, with failures, or not at all (the
first `withhold` requests get no report, so a test can kill the node between send and report).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.support.net import free_port

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"

Mode = Literal["same", "new"]


@dataclass
class Request:
    transaction_uid: str
    references: list[tuple[str, str]]
    calling_ae: str
    at: float = field(default_factory=time.monotonic)


class CommitmentPeer:
    """`mode`: where the report goes ("same" association, or a "new" one to `node`=(ae, host, port)).
    `fail`: SOP Instance UIDs to report as failed (0x0112). `withhold`: requests left unanswered first."""

    def __init__(
        self,
        ae_title: str = "COMMITPACS",
        *,
        mode: Mode = "same",
        node: tuple[str, str, int] | None = None,
        fail: frozenset[str] = frozenset(),
        withhold: int = 0,
    ) -> None:
        self.ae_title = ae_title
        self.mode = mode
        self.node = node
        self.fail = set(fail)
        self.withhold = withhold
        self.stored: list[str] = []  # SOP Instance UIDs, once per C-STORE
        self.requests: list[Request] = []
        self.reports: list[tuple[str, int | None]] = []  # (transaction UID, N-EVENT-REPORT response status)
        self.port = free_port()
        self._lock = threading.Lock()
        self.got_request = threading.Event()
        ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.add_supported_context(Verification)
        ae.add_supported_context(STORAGE_COMMITMENT)
        server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_N_ACTION, self._action)],
        )
        assert server is not None
        self.server = server

    def close(self) -> None:
        self.server.shutdown()

    def _store(self, event: evt.Event) -> int:
        with self._lock:
            self.stored.append(str(event.request.AffectedSOPInstanceUID))  # type: ignore[attr-defined]
        return 0x0000

    def _action(self, event: evt.Event) -> tuple[int, None]:
        ds = event.action_information  # type: ignore[attr-defined]
        refs = [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)) for i in ds.ReferencedSOPSequence]
        request = Request(str(ds.TransactionUID), refs, event.assoc.requestor.ae_title.strip())
        with self._lock:
            self.requests.append(request)
            answer = len(self.requests) > self.withhold
        self.got_request.set()
        if answer:
            threading.Thread(target=self._report, args=(event.assoc, request), daemon=True).start()
        return 0x0000, None

    def report_dataset(self, request: Request) -> tuple[Dataset, int]:
        ds = Dataset()
        ds.TransactionUID = request.transaction_uid
        ok, failed = [], []
        for cls, inst in request.references:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, inst
            if inst in self.fail:
                item.FailureReason = 0x0112
                failed.append(item)
            else:
                ok.append(item)
        if ok:
            ds.ReferencedSOPSequence = DicomSequence(ok)
        if failed:
            ds.FailedSOPSequence = DicomSequence(failed)
        return ds, 2 if failed else 1

    def _report(self, assoc: Any, request: Request) -> None:
        ds, event_type = self.report_dataset(request)
        if self.mode == "same":
            # Let the N-ACTION response go first (it is sent after this handler returned).
            while assoc.is_established and assoc._is_paused:
                time.sleep(0.002)
            time.sleep(0.05)
            try:
                rsp, _ = assoc.send_n_event_report(ds, event_type, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)
            except RuntimeError:  # the node released the association before the report
                rsp = Dataset()
        else:
            assert self.node is not None
            _, host, port = self.node
            ae = AE(ae_title=self.ae_title)
            ae.add_requested_context(STORAGE_COMMITMENT)
            # As a PACS does: report to the AE title that asked, at the address configured for it.
            reverse = ae.associate(
                host, port, ae_title=request.calling_ae, ext_neg=[build_role(STORAGE_COMMITMENT, scp_role=True)]
            )
            rsp = Dataset()
            if reverse.is_established:
                rsp, _ = reverse.send_n_event_report(ds, event_type, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)
                reverse.release()
        status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
        with self._lock:
            self.reports.append((request.transaction_uid, status))
