"""Retention: after `storage.keep_days`, delete the files of finished instances; keep their audit rows.

Only instances that reached a state nobody has to act on lose their files: `exported`, `skipped`,
`duplicate` and `rejected` (its quarantined bytes). `failed` and `dead` instances keep their source
and results until an administrator re-runs or re-sends them, so nothing undelivered is ever purged.
"""

from __future__ import annotations

import logging
import shutil
import threading
from datetime import datetime, timedelta
from pathlib import Path

from node.audit import AuditStore, InstanceState
from node.audit.models import Instance, utcnow
from node.runtime.config import Settings

log = logging.getLogger(__name__)

PURGEABLE = (InstanceState.EXPORTED, InstanceState.SKIPPED, InstanceState.DUPLICATE, InstanceState.REJECTED)


def purge(settings: Settings, store: AuditStore, now: datetime | None = None, limit: int = 1000) -> int:
    """Delete the files of purgeable instances finished more than keep_days ago; returns how many."""
    if settings.storage.keep_days <= 0:
        return 0
    cutoff = (now or utcnow()) - timedelta(days=settings.storage.keep_days)

    def remove(row: Instance) -> list[str]:
        removed = [p for p in (row.spool_path, row.quarantine_path) if p and _remove(Path(p))]
        results = settings.storage.results_dir / str(row.id)
        if results.exists():
            shutil.rmtree(results, ignore_errors=True)
            removed.append(str(results))
        return removed

    purged = store.purge_files(
        states=PURGEABLE,
        finished_before=cutoff,
        limit=limit,
        remove=remove,
        detail={"keep_days": settings.storage.keep_days},
    )
    if purged:
        log.info("retention: removed the files of %d instance(s) finished before %s", purged, cutoff.date())
    return purged


def _remove(path: Path) -> bool:
    try:
        path.unlink()
        path.with_suffix(".reason.json").unlink(missing_ok=True)  # a quarantined file's reason
        return True
    except FileNotFoundError:
        return False


class RetentionLoop:
    """Runs `purge` at start and then every `interval_s` (hourly) on a background thread."""

    def __init__(self, settings: Settings, store: AuditStore, *, interval_s: float = 3600.0) -> None:
        self.settings, self.store, self.interval_s = settings, store, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)

    def start(self) -> RetentionLoop:
        if self.settings.storage.keep_days > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        while True:
            try:
                while purge(self.settings, self.store) == 1000:
                    pass  # a backlog: keep going in batches
            except Exception:
                log.exception("retention pass failed")
            if self._stop.wait(self.interval_s):
                return
