"""The study summary SR of a triage decision: which image anchors it, the file, its exports.

A decision that changes (a new revision) gets a new report (:mod:`node.results.study_sr`) replacing the
last one issued; an unchanged one gets none. The report is built before the decision is recorded and
handed to :meth:`AuditStore.record_triage`, which queues its exports in the decision's transaction and
keeps its UIDs for the next revision, so a report goes out only with the revision it was built for,
once (a crash before the commit leaves an unreferenced file, rewritten on the next try).
The report is sent like an image's results, as an export of one analysed image of the study that
this node holds (its anchor): to that image's result destinations, with the same retries, dead letter
and storage commitment, and retention removes it with that image's results. No anchor here (every
analysed image is on another node), no destination, or a header that cannot be read: no report, and
the decision is recorded regardless.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import highdicom as hd

from node.analysis.finish import atomic_save, compared_with, device_info, recorded_models, result_destinations
from node.audit import AuditStore, Instance, NewExport
from node.audit.models import StudyTriage
from node.audit.triage_store import NewStudyReport
from node.results.common import read_source_header
from node.results.study_sr import ImageRef, ReportRef, StudySummary, build_study_sr
from node.runtime.config import Settings
from node.triage.rules import Decision, ImageFindings
from workers.api import ModelInfo

log = logging.getLogger(__name__)

KIND = "study-sr"


def summary_report(
    settings: Settings,
    store: AuditStore,
    *,
    decision: Decision,
    images: Sequence[ImageFindings],
    instances: Sequence[Instance],
    details: dict[int, dict[str, Any]],
    previous: StudyTriage | None,
    prior: StudyTriage | None,
    decided: datetime,
) -> NewStudyReport | None:
    """The report of the revision `decision` will be (previous revision + 1), or None when none is due."""
    if not settings.results.study_sr:
        return None
    by_id = {i.id: i for i in instances}
    analysed = [by_id[f.instance_id] for f in images if f.instance_id in by_id]
    mine = [i for i in analysed if i.node == store.node and i.spool_path]
    if not mine:
        return None  # nothing analysed here (a study of laterals only, or another node's images)
    source = decision.source
    anchor = next((i for i in mine if source is not None and i.id == source.instance_id), mine[0])
    destinations = result_destinations(anchor)
    if not destinations:
        return None
    revision = previous.revision + 1 if previous is not None else 1
    replaces = (
        ReportRef(previous.report_series_uid, previous.report_sop_uid)
        if previous is not None and previous.report_sop_uid
        else None
    )
    series_uid = replaces.series_instance_uid if replaces is not None else str(hd.UID())
    sop_uid = str(hd.UID())
    try:
        header = read_source_header(anchor.spool_path)
        report = build_study_sr(
            header,
            _summary(settings, store, decision, analysed, details, revision, prior),
            device=device_info(settings),
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            replaces=replaces,
            decided=decided,
        )
        path = settings.storage.results_dir / str(anchor.id) / f"study-summary-{revision}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(report, path)
    except (OSError, ValueError, AttributeError) as e:  # ResultError is a ValueError; a header lacking a UID
        log.warning("study %s: no summary SR for revision %d (%s)", anchor.study_id, revision, e)
        return None
    return NewStudyReport(
        revision=revision,
        instance_id=anchor.id,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        exports=[NewExport(dest, KIND, str(path), sop_uid) for dest in destinations],
    )


def _summary(
    settings: Settings,
    store: AuditStore,
    decision: Decision,
    analysed: Sequence[Instance],
    details: dict[int, dict[str, Any]],
    revision: int,
    prior: StudyTriage | None,
) -> StudySummary:
    refs = {i.id: ImageRef(i.sop_class_uid, i.sop_instance_uid, i.series_instance_uid) for i in analysed}

    def image(findings: ImageFindings | None) -> ImageRef | None:
        return refs.get(findings.instance_id) if findings is not None else None

    def models(findings: ImageFindings | None) -> list[ModelInfo]:
        return recorded_models(details.get(findings.instance_id, {})) if findings is not None else []

    sev, ptx = decision.severity_source, decision.pneumothorax
    return StudySummary(
        revision=revision,
        level=decision.level,
        reasons=decision.reasons,
        images=list(refs.values()),
        severity_score=decision.severity_score if image(sev) is not None else None,
        severity_image=image(sev),
        severity_models=models(sev),
        prior=compared_with(store, prior) if prior is not None and decision.prior is not None else None,
        pneumothorax_present=ptx.pneumothorax_present if ptx is not None and image(ptx) is not None else None,
        pneumothorax_probability=ptx.pneumothorax_probability if ptx is not None else None,
        pneumothorax_side=ptx.pneumothorax_side if ptx is not None else None,
        pneumothorax_image=image(ptx),
        pneumothorax_models=models(ptx),
        rules=_rules(settings),
    )


def _rules(settings: Settings) -> list[str]:
    """The triage rules in force, one line each (the Algorithm Parameters of the triage group)."""
    cfg = settings.triage
    lines = [
        f"{rule.name}: {rule.level} when "
        + " and ".join(f"{key} {value}" for key, value in rule.when.model_dump(exclude_none=True).items())
        for rule in cfg.rules
    ]
    return [*lines, f"allow_experimental={str(cfg.allow_experimental).lower()}"]
