"""Result objects as a PACS receives them: each image's SEG and SR, and each study's summary SRs.

Every end-to-end test counts what arrived ("counts in = counts out"); with triage on (the default), a
study also gets one study summary SR per triage revision (node.results.study_sr). `split` sets those
apart so that a test counts the per-image results exactly, and `check_chains` checks the summaries the
same way everywhere: per study the revisions 1..n, one series, each replacing the one before it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from itertools import pairwise

import pydicom

from node.audit import AuditStore
from node.results.study_sr import SERIES_NUMBER

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def is_summary(ds: pydicom.Dataset) -> bool:
    return str(ds.SOPClassUID) == COMPREHENSIVE_SR and int(ds.get("SeriesNumber") or 0) == SERIES_NUMBER


def split(received: Iterable[pydicom.Dataset]) -> tuple[list[pydicom.Dataset], list[pydicom.Dataset]]:
    """(per-image results, study summary SRs)."""
    images: list[pydicom.Dataset] = []
    summaries: list[pydicom.Dataset] = []
    for ds in received:
        (summaries if is_summary(ds) else images).append(ds)
    return images, summaries


def check_chains(summaries: Iterable[pydicom.Dataset]) -> dict[str, int]:
    """Per study: revisions 1..n, each once, one series, revision k replacing k-1. Returns {study: n}."""
    by_study: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for ds in summaries:
        by_study[str(ds.StudyInstanceUID)].append(ds)
    for study, reports in by_study.items():
        reports.sort(key=lambda d: int(d.InstanceNumber))
        assert [int(d.InstanceNumber) for d in reports] == list(range(1, len(reports) + 1)), (study, reports)
        assert len({str(d.SeriesInstanceUID) for d in reports}) == 1, f"study {study}: revisions in several series"
        assert "PredecessorDocumentsSequence" not in reports[0], f"study {study}: revision 1 replaces something"
        for before, after in pairwise(reports):
            [replaced] = after.PredecessorDocumentsSequence
            [series] = replaced.ReferencedSeriesSequence
            assert (replaced.StudyInstanceUID, series.SeriesInstanceUID) == (study, before.SeriesInstanceUID)
            assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == before.SOPInstanceUID
    return {study: len(reports) for study, reports in by_study.items()}


def reports_issued(store: AuditStore) -> int:
    """How many study summary SRs the node has issued (each is queued to every result destination)."""
    return len({e.sop_instance_uid for e in store.list_exports() if e.kind == "study-sr"})


def settled(store: AuditStore, reports: int) -> bool:
    """At least `reports` studies have their summary SR, and every export of the node is sent."""
    issued = [r for r in store.list_triage(limit=None) if r.triage.report_sop_uid]
    return len(issued) >= reports and all(e.state == "sent" for e in store.list_exports())
