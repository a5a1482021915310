"""The ingest pipeline behind C-STORE: check, persist, record, route, hand off.

Independent of pynetdicom: the SCP hands over the received file and the command fields, and answers
the status returned here. STOW-RS (:mod:`node.dicomweb.stow`) hands over each part the same way, with
no command: the data set's own UIDs stand for the command's, and the answer is its FailureReason. Order matters (persist before ack): the file is fsynced and renamed into the
spool and its row committed before a success status is returned.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from node.analysis.handoff import Dispatcher, HandoffContext, leave_queued
from node.audit import AuditStore, DuplicateInstance, Instance, InstanceState, ReceivedInstance
from node.audit.store import RouteOutcome
from node.ingest.header import (
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    STATUS_STORED_NOT_MATCHING,
    Header,
    Refusal,
    check_dataset,
    pixel_padding_excess,
    read_header,
    storage_sop_classes,
)
from node.ingest.routing import RouteDecision, decide
from node.ingest.spool import Spool
from node.runtime.config import Settings

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110  # our fault, not the peer's: it may retry
STATUS_DUPLICATE_SOP_INSTANCE = 0x0111  # PS3.7 C.4: the UID is stored already, with other content


@dataclass(frozen=True)
class StoreRequest:
    """The C-STORE request fields ingest needs."""

    affected_sop_class: str
    affected_sop_instance: str
    transfer_syntax_uid: str
    calling_ae: str
    priority: int = 0
    association_id: int | None = None
    peer: str = ""
    received_bytes: int | None = None  # data set bytes the peer sent, kept or not (node.ingest.guard counts them)
    study_instance_uid: str = ""  # STOW-RS to /studies/{uid}: the study every instance must belong to

    def refused(self, size: int) -> ReceivedInstance:
        """What the audit log records of a data set refused before its header could be trusted."""
        return ReceivedInstance(
            sop_instance_uid=self.affected_sop_instance,
            sop_class_uid=self.affected_sop_class,
            transfer_syntax_uid=self.transfer_syntax_uid,
            calling_ae=self.calling_ae,
            association_id=self.association_id,
            priority=self.priority,
            size_bytes=size,
        )


@dataclass(frozen=True)
class Outcome:
    status: int
    kind: Literal["stored", "duplicate", "rejected", "refused", "error"]
    instance_id: int | None = None
    reason: str = ""

    @property
    def warned(self) -> bool:
        """Stored, with a warning status (e.g. 0xB007) whose reason the peer is told."""
        return self.kind in ("stored", "duplicate") and self.status != STATUS_SUCCESS


@dataclass(frozen=True)
class ResumeReport:
    rerouted: int = 0
    handed_off: int = 0
    failed: int = 0


class Ingest:
    def __init__(
        self, settings: Settings, store: AuditStore, spool: Spool, dispatcher: Dispatcher | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.spool = spool
        self.dispatcher = dispatcher

    # -- receiving ------------------------------------------------------------------------------------

    def receive(self, received: Path, req: StoreRequest) -> Outcome:
        """Take a fully received file (preamble + file meta + data set as sent); never raises."""
        try:
            return self._receive(received, req)
        except Exception as e:
            log.exception("C-STORE of %s from %s failed inside the node", req.affected_sop_instance, req.calling_ae)
            try:
                self.store.add_event(
                    "instance.error",
                    association_id=req.association_id,
                    detail={"sop_instance_uid": req.affected_sop_instance, "error": repr(e)},
                )
            except Exception:
                log.exception("could not audit the failure")
            return Outcome(STATUS_PROCESSING_FAILURE, "error", reason=repr(e))

    def _receive(self, received: Path, req: StoreRequest) -> Outcome:
        size = max(received.stat().st_size, req.received_bytes or 0)
        limit_mb = self.settings.storage.max_instance_mb
        if size > limit_mb * 1024 * 1024:
            return self._refuse_oversize(received, req, size, limit_mb)
        if not self.spool.has_room(self.settings.storage.min_free_mb):
            reason = (
                f"free disk {self.spool.free_mb():.0f} MB below storage.min_free_mb {self.settings.storage.min_free_mb}"
            )
            log.warning("refusing %s: %s", req.affected_sop_instance, reason)
            self.store.add_event(
                "instance.refused",
                association_id=req.association_id,
                detail={
                    "sop_instance_uid": req.affected_sop_instance,
                    "status": f"0x{STATUS_OUT_OF_RESOURCES:04X}",
                    "reason": reason,
                },
            )
            return Outcome(STATUS_OUT_OF_RESOURCES, "refused", reason=reason)

        try:
            header = read_header(received, req.transfer_syntax_uid, max_inflated_bytes=limit_mb * 1024 * 1024)
            if not req.affected_sop_class and not req.affected_sop_instance:  # STOW-RS: no command
                req = replace(
                    req, affected_sop_class=header.sop_class_uid, affected_sop_instance=header.sop_instance_uid
                )
                if header.sop_class_uid and header.sop_class_uid not in storage_sop_classes():
                    # What C-STORE settles in negotiation (no presentation context) is checked here.
                    raise Refusal(
                        STATUS_SOP_CLASS_NOT_SUPPORTED,
                        f"SOP Class {header.sop_class_uid} is not a storage SOP class the node accepts",
                    )
            check_dataset(
                header,
                affected_sop_class=req.affected_sop_class,
                affected_sop_instance=req.affected_sop_instance,
                file_size=size,
            )
            if req.study_instance_uid and header.study_instance_uid != req.study_instance_uid:
                raise Refusal(
                    STATUS_DATASET_MISMATCH,
                    f"Study Instance UID {header.study_instance_uid} is not the "
                    f"study {req.study_instance_uid} of the request",
                )
        except Refusal as r:
            return self._reject(received, req, r, size)

        info = self._info(header, req, size, spool_path="")
        original = self.store.find_live_instance(header.sop_instance_uid)
        if original is not None:
            conflict = self._conflict(header, req, received, original)
            if conflict:
                return self._reject_conflict(received, req, info, original, conflict)
            row = self.store.record_duplicate(info, original.id)
            log.info(
                "duplicate %s from %s (original instance %d)", header.sop_instance_uid, req.calling_ae, original.id
            )
            if self.settings.results.reanalyze_duplicates:
                self._reanalyze(original.id, original.state)
            return Outcome(STATUS_SUCCESS, "duplicate", row.id, row.reason)
        return self._store_new(received, header, req, size)

    def _store_new(self, received: Path, header: Header, req: StoreRequest, size: int) -> Outcome:
        """Spool, record (routed in the same transaction) and hand off an instance not stored before."""
        final = self.spool.commit(received, header.study_instance_uid, header.sop_instance_uid)
        info = replace(self._info(header, req, size, spool_path=str(final)), warning=_warning(header))
        route = self._route_outcome(header, req.calling_ae)
        try:
            instance = self.store.record_instance_received(info, route)
        except DuplicateInstance:
            # The same instance arrived on two associations at once; the other one recorded it first.
            live = self.store.find_live_instance(header.sop_instance_uid)
            assert live is not None
            row = self.store.record_duplicate(self._info(header, req, size, ""), live.id)
            return Outcome(STATUS_SUCCESS, "duplicate", row.id, row.reason)
        if route is None:
            self.route(instance.id, header, req.calling_ae)  # routing failed above: try once more
        elif route.state == InstanceState.QUEUED:
            self.hand_off(instance.id)
        if info.warning:
            log.warning("stored %s from %s with a warning: %s", header.sop_instance_uid, req.calling_ae, info.warning)
            return Outcome(STATUS_STORED_NOT_MATCHING, "stored", instance.id, info.warning)
        return Outcome(STATUS_SUCCESS, "stored", instance.id)

    def _refuse_oversize(self, received: Path, req: StoreRequest, size: int, limit_mb: int) -> Outcome:
        """Larger than storage.max_instance_mb: 0xA700, nothing kept (the bytes past the cap were never
        written), a rejected row that says so."""
        reason = f"data set of {size} bytes exceeds storage.max_instance_mb {limit_mb}"
        received.unlink(missing_ok=True)
        info = req.refused(size)
        row = self.store.record_rejected(info, status=STATUS_OUT_OF_RESOURCES, reason=reason, quarantine_path="")
        log.warning(
            "refused %s from %s (%s) with 0xA700: %s", req.affected_sop_instance, req.calling_ae, req.peer, reason
        )
        return Outcome(STATUS_OUT_OF_RESOURCES, "rejected", row.id, reason)

    def _conflict(self, header: Header, req: StoreRequest, received: Path, original: Instance) -> str:
        """Why a data set with the SOP Instance UID of a stored instance is another data set ('' when it
        is a copy): another SOP class, series or study, or, in the same transfer syntax, other bytes.

        A copy sent again in another transfer syntax counts as the same; when the stored file is gone
        (retention), the UIDs the audit log keeps decide alone."""
        if header.sop_class_uid != original.sop_class_uid:
            return f"SOP Class UID {header.sop_class_uid}, stored {original.sop_class_uid}"
        if original.series_instance_uid and header.series_instance_uid != original.series_instance_uid:
            return f"Series Instance UID {header.series_instance_uid}, stored {original.series_instance_uid}"
        stored = Path(original.spool_path)
        try:
            stored_header = read_header(
                stored,
                original.transfer_syntax_uid,
                max_inflated_bytes=self.settings.storage.max_instance_mb * 1024 * 1024,
            )
        except (Refusal, OSError):
            return ""
        if stored_header.study_instance_uid != header.study_instance_uid:
            return f"Study Instance UID {header.study_instance_uid}, stored {stored_header.study_instance_uid}"
        same_syntax = (req.transfer_syntax_uid or header.transfer_syntax_uid) == original.transfer_syntax_uid
        if same_syntax and _dataset_digest(received) != _dataset_digest(stored):
            return "same UIDs, other content (SHA-256 of the data set differs)"
        return ""

    def _reject_conflict(
        self, received: Path, req: StoreRequest, info: ReceivedInstance, original: Instance, why: str
    ) -> Outcome:
        """Never dropped, never stored over the first: quarantined, audited, answered 0x0111."""
        reason = f"SOP Instance UID already stored as instance {original.id} with another data set: {why}"
        path = self.spool.quarantine(
            received,
            req.affected_sop_instance,
            {
                "status": f"0x{STATUS_DUPLICATE_SOP_INSTANCE:04X}",
                "reason": reason,
                "calling_ae": req.calling_ae,
                "peer": req.peer,
                "stored_instance_id": original.id,
                "stored_calling_ae": original.calling_ae,
                "sop_instance_uid": req.affected_sop_instance,
                "association_id": req.association_id,
            },
        )
        row = self.store.record_rejected(
            info,
            status=STATUS_DUPLICATE_SOP_INSTANCE,
            reason=reason,
            quarantine_path=str(path),
            conflict_with=original.id,
        )
        log.warning(
            "conflict: %s from %s (%s) is not the stored instance %d (from %s): %s",
            req.affected_sop_instance,
            req.calling_ae,
            req.peer,
            original.id,
            original.calling_ae,
            why,
        )
        return Outcome(STATUS_DUPLICATE_SOP_INSTANCE, "rejected", row.id, reason)

    def _route_outcome(self, header: Header, calling_ae: str) -> RouteOutcome | None:
        """The routing decision as the state to commit with the row (None: routing failed, stays received)."""
        try:
            d = decide(header, calling_ae, self.settings.rules, self.settings.models)
        except Exception:
            log.exception("routing %s failed; it stays received", header.sop_instance_uid)
            return None
        if d.action == "skip":
            return RouteOutcome(InstanceState.SKIPPED, rule=d.rule, reason=d.reason)
        return RouteOutcome(InstanceState.QUEUED, rule=d.rule, models=d.models, destinations=d.destinations)

    def refuse(self, received: Path, req: StoreRequest, status: int, reason: str) -> Outcome:
        """Refuse input before it is read as DICOM (a STOW-RS part that is not application/dicom): quarantined
        and recorded like any rejected data set."""
        try:
            size = received.stat().st_size
        except OSError:
            size = 0
        return self._reject(received, req, Refusal(status, reason), size)

    def _reject(self, received: Path, req: StoreRequest, r: Refusal, size: int) -> Outcome:
        path = self.spool.quarantine(
            received,
            req.affected_sop_instance,
            {
                "status": f"0x{r.status:04X}",
                "reason": r.reason,
                "calling_ae": req.calling_ae,
                "peer": req.peer,
                "sop_class_uid": req.affected_sop_class,
                "sop_instance_uid": req.affected_sop_instance,
                "transfer_syntax_uid": req.transfer_syntax_uid,
                "association_id": req.association_id,
            },
        )
        info = req.refused(size)
        row = self.store.record_rejected(info, status=r.status, reason=r.reason, quarantine_path=str(path))
        log.warning(
            "rejected %s from %s with 0x%04X: %s", req.affected_sop_instance, req.calling_ae, r.status, r.reason
        )
        return Outcome(r.status, "rejected", row.id, r.reason)

    @staticmethod
    def _info(h: Header, req: StoreRequest, size: int, spool_path: str) -> ReceivedInstance:
        return ReceivedInstance(
            sop_instance_uid=h.sop_instance_uid,
            sop_class_uid=h.sop_class_uid,
            transfer_syntax_uid=req.transfer_syntax_uid or h.transfer_syntax_uid,
            study_instance_uid=h.study_instance_uid,
            series_instance_uid=h.series_instance_uid,
            calling_ae=req.calling_ae,
            association_id=req.association_id,
            modality=h.modality,
            body_part=h.body_part,
            view_position=h.view_position,
            patient_id=h.patient_id,
            accession_number=h.accession_number,
            study_date=h.study_date,
            priority=req.priority,
            size_bytes=size,
            spool_path=spool_path,
        )

    def _reanalyze(self, instance_id: int, state: str) -> None:
        """results.reanalyze_duplicates: a resent instance is analysed again from the stored copy."""
        if state not in (InstanceState.EXPORTED, InstanceState.FAILED, InstanceState.DEAD):
            return  # still in progress (results will come) or routed away (skipped stays skipped)
        self.store.set_instance_state(
            instance_id, InstanceState.QUEUED, "sent again: re-analysis", detail={"reanalyze_duplicates": True}
        )
        self.hand_off(instance_id)

    # -- routing and hand-off -------------------------------------------------------------------------

    def route(self, instance_id: int, header: Header, calling_ae: str) -> RouteDecision | None:
        """Apply the routing rules to a received instance; on error it stays ``received`` (resume retries)."""
        try:
            decision = decide(header, calling_ae, self.settings.rules, self.settings.models)
            if decision.action == "skip":
                self.store.set_instance_state(instance_id, InstanceState.SKIPPED, decision.reason, rule=decision.rule)
                return decision
            self.store.set_instance_state(
                instance_id,
                InstanceState.QUEUED,
                rule=decision.rule,
                models=decision.models,
                destinations=decision.destinations,
            )
        except Exception:
            log.exception("routing instance %d failed; it stays received", instance_id)
            return None
        self.hand_off(instance_id)
        return decision

    def hand_off(self, instance_id: int) -> None:
        if self.dispatcher is not None:
            self.dispatcher.submit(instance_id)
        else:
            leave_queued(HandoffContext(self.settings, self.store), instance_id)  # no dispatcher: ingest only

    def resume_pending(self) -> ResumeReport:
        """At start: route again what was received but not routed, hand off again what was queued."""
        rerouted = handed_off = failed = 0
        for inst in self.store.pending_instances(own=True):  # another node's images are not on this disk
            if inst.state == InstanceState.RECEIVED:
                path = Path(inst.spool_path)
                try:
                    header = read_header(
                        path,
                        inst.transfer_syntax_uid,
                        max_inflated_bytes=self.settings.storage.max_instance_mb * 1024 * 1024,
                    )
                except (Refusal, OSError) as e:
                    self.store.set_instance_state(inst.id, InstanceState.FAILED, f"cannot resume: {e}")
                    failed += 1
                    continue
                self.route(inst.id, header, inst.calling_ae)
                rerouted += 1
            elif inst.state == InstanceState.QUEUED:
                self.hand_off(inst.id)
                handed_off += 1
        report = ResumeReport(rerouted, handed_off, failed)
        if rerouted or handed_off or failed:
            log.info("resumed pending instances: %s", report)
        return report


def _warning(h: Header) -> str:
    """Why a stored data set earns a warning status instead of success ('' when it does not)."""
    excess = pixel_padding_excess(h)
    if excess:
        return f"Pixel Data: {excess} bytes of trailing padding ignored"  # fits Error Comment (64)
    return ""


def _dataset_digest(path: Path) -> str:
    """SHA-256 of a received file's data set as sent (after preamble and file meta, which the node writes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(144)
        start = 0
        if head[128:132] == b"DICM" and len(head) == 144:
            (group_length,) = struct.unpack("<L", head[140:144])
            start = 144 + group_length
        f.seek(start)
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
