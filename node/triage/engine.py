"""The triage loop: find studies that are stable and fully analysed, decide their level, queue alerts.

A study is decided when no instance arrived for ``triage.stable_s`` and none of its instances is
still waiting for analysis; it is decided again when a late instance arrives or an instance is
analysed again (the decision row keeps which instances it saw). Each decision and the alerts it
queues are one transaction (:meth:`AuditStore.record_triage`); delivering them is
:mod:`node.alerts.deliver`'s job. Runs once per node, beside the exporter; several nodes sharing one
database each decide only the studies they own (``studies.node``: the node that received the first
image, which holds its header), so a study is decided, and alerted, by one node; decisions are
idempotent and alerts deduplicated under the study lock besides.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from node.alerts.message import NOT_FOR_DIAGNOSTIC_USE, AlertModel, Prior, TriageAlert
from node.analysis.finish import recorded_models
from node.audit import AuditStore, Instance, Study
from node.audit.models import utcnow
from node.audit.triage_store import NewAlert, is_new_decision
from node.dicom_values import dicom_date, dicom_time, patient_sex
from node.runtime import metrics
from node.runtime.config import Settings
from node.runtime.loop import BackgroundLoop
from node.triage.priors import PriorFetcher, PriorRequest
from node.triage.report import summary_report
from node.triage.rules import Decision, ImageFindings, decide

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PatientHeader:
    """Identifiers alerts need, read from the source header (the audit tables keep only a few)."""

    patient_id: str = ""
    issuer: str = ""
    name: str = ""
    birth_date: str = ""
    sex: str = ""
    accession: str = ""
    study_date: str = ""
    study_time: str = ""

    @classmethod
    def read(cls, path: str | Path, study: Study) -> PatientHeader:
        try:
            ds = pydicom.dcmread(
                path,
                stop_before_pixels=True,
                force=True,
                specific_tags=[
                    "PatientID",
                    "IssuerOfPatientID",
                    "PatientName",
                    "PatientBirthDate",
                    "PatientSex",
                    "AccessionNumber",
                    "StudyDate",
                    "StudyTime",
                ],
            )
        except (OSError, ValueError, TypeError) as e:  # spool file purged by retention, say
            log.warning("study %d: cannot read the source header (%s); using the audit row", study.id, e)
            return cls(patient_id=study.patient_id, accession=study.accession_number, study_date=study.study_date)

        def text(keyword: str) -> str:
            return str(ds.get(keyword, "") or "").strip()

        return cls(
            patient_id=text("PatientID"),
            issuer=text("IssuerOfPatientID"),
            name=text("PatientName"),
            birth_date=dicom_date(text("PatientBirthDate")),
            sex=patient_sex(text("PatientSex")),
            accession=text("AccessionNumber"),
            study_date=dicom_date(text("StudyDate")),
            study_time=dicom_time(text("StudyTime")),
        )


def image_findings(inst: Instance, detail: dict[str, Any]) -> ImageFindings:
    """The worker's figures for one analysed instance, from its ``instance.analyzed`` event."""
    sev = detail.get("severity_score")
    prob = detail.get("pneumothorax_probability")
    present = detail.get("pneumothorax_present")
    return ImageFindings(
        instance_id=inst.id,
        sop_instance_uid=inst.sop_instance_uid,
        series_instance_uid=inst.series_instance_uid,
        severity_score=int(sev) if sev is not None else None,
        pneumothorax_present=bool(present) if present is not None else None,
        pneumothorax_probability=float(prob) if prob is not None else None,
        pneumothorax_side=detail.get("pneumothorax_side") or None,
        models=tuple(AlertModel(m.name, m.version, m.status) for m in recorded_models(detail)),
    )


def inputs_key(instances: list[Instance]) -> list[str]:
    """What a decision saw: each instance with its analysis run (a re-run or late instance changes it)."""
    return [f"{i.id}@{i.job_id}" if i.analyzed_at is not None else f"{i.id}:{i.state}" for i in instances]


def build_alert(
    decision: Decision, study: Study, header: PatientHeader, *, revision: int, alert_id: str, decided_at: str
) -> TriageAlert:
    src = decision.source
    ptx = decision.pneumothorax
    models = list({m.name: m for f in ([src] if src else []) + ([ptx] if ptx else []) for m in f.models}.values())
    experimental = decision.experimental or any(m.status == "experimental" for m in models)
    return TriageAlert(
        alert_id=alert_id,
        created_at=decided_at,
        level=decision.level,
        reasons=list(decision.reasons),
        study_instance_uid=study.study_instance_uid,
        accession_number=header.accession or study.accession_number,
        revision=revision,
        severity_score=decision.severity_score,
        severity_change=decision.severity_change,
        prior=decision.prior,
        pneumothorax_present=ptx.pneumothorax_present if ptx else None,
        pneumothorax_probability=ptx.pneumothorax_probability if ptx else None,
        pneumothorax_side=ptx.pneumothorax_side if ptx else None,
        source_sop_instance_uid=src.sop_instance_uid if src else "",
        source_series_instance_uid=src.series_instance_uid if src else "",
        models=models,
        experimental=experimental,
        note=NOT_FOR_DIAGNOSTIC_USE if experimental else "",
        patient_id=header.patient_id or study.patient_id,
        issuer_of_patient_id=header.issuer,
        patient_name=header.name,
        patient_birth_date=header.birth_date,
        patient_sex=header.sex,
        study_date=header.study_date or study.study_date,
        study_time=header.study_time,
    )


class TriageEngine(BackgroundLoop):
    """Decides stable studies (``run_once``), in a thread (``start``/``stop``) or called directly."""

    def __init__(
        self,
        settings: Settings,
        store: AuditStore,
        *,
        interval_s: float = 1.0,
        on_alerts: Callable[[], None] | None = None,
        priors: PriorFetcher | None = None,
    ) -> None:
        super().__init__("triage", interval_s)
        self.settings = settings
        self.store = store
        self.priors = priors
        self.on_alerts = on_alerts

    def run_once(self) -> int:
        """Decide every study that is due; returns how many were decided."""
        cfg = self.settings.triage
        due = self.store.triage_candidates(stable_s=cfg.stable_s, max_age_s=cfg.max_age_h * 3600, own=True)
        queued = 0
        for study_id in due:
            if self.stopping:
                break
            try:
                queued += self.decide_study(study_id)
            except Exception:  # one bad study must not stop the others; it is tried again next pass
                log.exception("triage of study %d failed", study_id)
        if queued and self.on_alerts is not None:
            self.on_alerts()
        return len(due)

    def decide_study(self, study_id: int) -> int:
        """Decide one study now (whether stable or not); returns the number of alerts queued."""
        cfg = self.settings.triage
        study, instances, details = self.store.triage_inputs(study_id)
        analysed = [i for i in instances if i.analyzed_at is not None and i.id in details]
        images = [image_findings(i, details[i.id]) for i in analysed]
        # The header comes from an image on this node's disk (the study's owner received its first one).
        local = [i for i in analysed + instances if i.node == self.store.node and i.spool_path]
        source = local[0] if local else analysed[0] if analysed else (instances[0] if instances else None)
        header = (
            PatientHeader.read(source.spool_path, study)
            if source and source.spool_path
            else PatientHeader(
                patient_id=study.patient_id, accession=study.accession_number, study_date=study.study_date
            )
        )
        prior_row = self.store.find_prior(
            study_id=study.id, patient_id=header.patient_id, issuer=header.issuer, study_date=header.study_date
        )
        prior = (
            Prior(self.store.study_uid(prior_row.study_id), prior_row.study_date, prior_row.severity_score)
            if prior_row is not None
            else None
        )
        # A prior the node moved in from the archive: old news (no alerts, no search for its own prior).
        fetched = (
            self.priors is not None and self.priors.enabled and self.store.fetched_as_prior(study.study_instance_uid)
        )
        if prior is None and self.priors is not None and images and not fetched:
            self.priors.request(PriorRequest(study.id, study.study_instance_uid, header.patient_id, header.study_date))
        decision = decide(images, cfg, prior)
        findings = tuple(decision.fired) or (decision.level,)
        alerts = [
            NewAlert(name, dest.type, findings)
            for name in cfg.routes.get(decision.level, [])
            if (dest := cfg.destination(name))
        ]
        if fetched:
            alerts = []
        decided = utcnow()
        decided_at = decided.isoformat()

        def payload(revision: int, alert_id: str) -> dict[str, Any]:
            return build_alert(
                decision, study, header, revision=revision, alert_id=alert_id, decided_at=decided_at
            ).to_json()

        summary = _summary(decision)
        previous = self.store.get_triage(study.id)
        report = (
            summary_report(
                self.settings,
                self.store,
                decision=decision,
                images=images,
                instances=instances,
                details=details,
                previous=previous,
                prior=prior_row,
                decided=decided,
            )
            if is_new_decision(previous, decision.level, decision.reasons, summary)
            else None
        )
        row, queued, changed = self.store.record_triage(
            study.id,
            inputs=inputs_key(instances),
            level=decision.level,
            reasons=decision.reasons,
            summary=summary,
            severity_score=decision.severity_score,
            patient_id=header.patient_id,
            issuer=header.issuer,
            study_date=header.study_date,
            alerts=alerts,
            payload=payload,
            report=report,
        )
        reopened = self.store.reopen_later_studies(
            study_id=study.id, patient_id=header.patient_id, issuer=header.issuer, study_date=header.study_date
        )
        if reopened:
            log.info("study %d is a prior of study(ies) %s: deciding them again", study.id, reopened)
        if not changed:
            log.debug("study %d: %s as before (revision %d)", study.id, decision.level, row.revision)
            return len(queued)
        metrics.count_triage(decision.level)  # decisions, not re-checks that changed nothing
        log.info(
            "study %d: %s (revision %d, %d alert(s) queued%s): %s",
            study.id,
            decision.level,
            row.revision,
            len(queued),
            ", summary SR queued" if report is not None and row.report_sop_uid == report.sop_instance_uid else "",
            "; ".join(decision.reasons),
        )
        return len(queued)


def _summary(decision: Decision) -> dict[str, Any]:
    """What the worklist and the CLI show, stable under JSON (compared to tell an unchanged decision)."""
    src, ptx = decision.source, decision.pneumothorax
    return {
        "images": decision.images,
        "severity_score": decision.severity_score,
        "severity_sop_instance_uid": decision.severity_source.sop_instance_uid if decision.severity_source else "",
        "severity_change": decision.severity_change,
        "prior": None
        if decision.prior is None
        else {
            "study_instance_uid": decision.prior.study_instance_uid,
            "study_date": decision.prior.study_date,
            "severity_score": decision.prior.severity_score,
        },
        "pneumothorax_present": ptx.pneumothorax_present if ptx else None,
        "pneumothorax_probability": ptx.pneumothorax_probability if ptx else None,
        "pneumothorax_side": ptx.pneumothorax_side if ptx else None,
        "pneumothorax_sop_instance_uid": ptx.sop_instance_uid if ptx else "",
        "source_sop_instance_uid": src.sop_instance_uid if src else "",
        "fired": decision.fired,
        "experimental": decision.experimental,
    }
