"""Priors from the archive: C-FIND a patient's earlier CR/DX studies at a Q/R SCP, C-MOVE the latest to us.

Off unless ``triage.priors_from`` names a known AE title (a PACS or VNA that answers Study Root
C-FIND and C-MOVE and knows the node as a move destination). When the triage engine decides a study
whose patient has no earlier study in the node's own store, it asks this fetcher once for that
study: the most recent earlier CR/DX study of the same Patient ID is moved to the node's own AE
title, arrives by C-STORE like any study, is analysed and decided (its decision queues no alerts:
the study is old news), and its decision re-opens the later studies of the patient, so the study
that asked gets its severity change. Queries run on one background thread, never in the triage
loop; every request and its outcome is an audit event (``priors.requested``).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.audit import AuditStore
from node.export.sender import tls_client_context
from node.runtime.config import Settings

log = logging.getLogger(__name__)

PRIOR_MODALITIES = {"CR", "DX"}


@dataclass(frozen=True)
class PriorRequest:
    study_id: int
    study_instance_uid: str
    patient_id: str
    study_date: str  # DA; priors are studies before it ("" = any date but this study)


class PriorFetcher:
    """One background thread working through prior requests (``request`` never blocks)."""

    def __init__(self, settings: Settings, store: AuditStore) -> None:
        self.settings = settings
        self.store = store
        self._queue: queue.Queue[PriorRequest | None] = queue.Queue(maxsize=1000)
        self._asked: set[int] = set()
        self._thread = threading.Thread(target=self._run, name="priors", daemon=True)

    @property
    def enabled(self) -> bool:
        return bool(self.settings.triage.priors_from)

    def start(self) -> PriorFetcher:
        if self.enabled:
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(30)

    def request(self, req: PriorRequest) -> bool:
        """Queue a search for `req`'s prior, once per study per node run; False when not queued."""
        if not self.enabled or not req.patient_id or req.study_id in self._asked:
            return False
        self._asked.add(req.study_id)
        try:
            self._queue.put_nowait(req)
        except queue.Full:
            log.warning("prior requests queue full; study %d gets none", req.study_id)
            return False
        return True

    def _run(self) -> None:
        while (req := self._queue.get()) is not None:
            try:
                self.fetch(req)
            except Exception:  # a broken archive must not end the thread
                log.exception("prior search for study %d failed", req.study_id)

    def fetch(self, req: PriorRequest) -> str:
        """Find and move the patient's latest earlier CR/DX study; returns its UID ("" when none)."""
        name = self.settings.triage.priors_from
        entry = self.store.get_ae(name)
        detail: dict[str, object] = {"study_instance_uid": req.study_instance_uid, "archive": name}
        if entry is None or entry.host is None or entry.port is None:
            detail["error"] = f"triage.priors_from names {name!r}, which is not an AE title with host and port"
            self.store.add_event("priors.requested", study_id=req.study_id, detail=detail)
            log.warning("%s", detail["error"])
            return ""
        ae = AE(ae_title=self.settings.sender.calling_ae or self.settings.dicom.ae_title)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        timeout = self.settings.sender.timeout_s
        for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(ae, attr, timeout)
        tls_args = (tls_client_context(self.settings.dicom.tls), entry.host) if entry.tls else None
        assoc = ae.associate(entry.host, entry.port, ae_title=entry.name, tls_args=tls_args)
        if not assoc.is_established:
            detail["error"] = f"association to {entry.name}@{entry.host}:{entry.port} failed"
            self.store.add_event("priors.requested", study_id=req.study_id, detail=detail)
            return ""
        try:
            candidates = self._find(assoc, req)
            known = [uid for uid, _ in candidates if self.store.get_study(uid) is not None]
            wanted = next(((uid, date) for uid, date in candidates if uid not in known), None)
            detail.update(found=len(candidates), already_here=len(known))
            if wanted is None:
                self.store.add_event("priors.requested", study_id=req.study_id, detail=detail)
                return ""
            status = self._move(assoc, wanted[0])
            detail.update(
                moved=wanted[0],
                prior_study_date=wanted[1],
                move_status=f"0x{status:04X}" if status is not None else "no response",
            )
        finally:
            if assoc.is_established:
                assoc.release()
        self.store.add_event("priors.requested", study_id=req.study_id, detail=detail)
        log.info("study %d: prior %s requested from %s (%s)", req.study_id, wanted[0], name, detail["move_status"])
        return wanted[0]

    def _find(self, assoc: Association, req: PriorRequest) -> list[tuple[str, str]]:
        """(Study Instance UID, Study Date) of the patient's earlier CR/DX studies, newest first."""
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = req.patient_id
        query.StudyInstanceUID = ""
        query.StudyDate = f"-{req.study_date}" if req.study_date else ""
        query.ModalitiesInStudy = ""
        found: list[tuple[str, str]] = []
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if identifier is None or not status or status.Status not in (0xFF00, 0xFF01):
                continue
            uid = str(identifier.get("StudyInstanceUID", "") or "")
            value = identifier.get("ModalitiesInStudy")
            # One value comes back as a str, several as a MultiValue: never iterate a str's letters.
            modalities = {str(value)} if isinstance(value, str) else {str(m) for m in (value or [])}
            date = str(identifier.get("StudyDate", "") or "")
            if not uid or uid == req.study_instance_uid or (req.study_date and date and date >= req.study_date):
                continue
            if modalities and not modalities & PRIOR_MODALITIES:
                continue
            found.append((uid, date))
        return sorted(found, key=lambda f: f[1], reverse=True)

    def _move(self, assoc: Association, study_uid: str) -> int | None:
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = study_uid
        final: int | None = None
        for status, _ in assoc.send_c_move(
            ident, self.settings.dicom.ae_title, StudyRootQueryRetrieveInformationModelMove
        ):
            if status:
                final = int(status.Status)
        return final
