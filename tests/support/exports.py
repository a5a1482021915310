"""The node's Exporter over a real SQLite audit log, for tests of delivery, retries and the dead letter.

Result files are registered as exports of one instance to one destination AE, exactly as
`node.finish` registers them; `run` makes exporter passes (the production retry policy: backoff,
attempt budget, final statuses) until nothing is pending or the passes are used up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from node.audit import AuditStore, ReceivedInstance
from node.audit.models import Export, ExportAttempt, ExportState, as_utc, utcnow
from node.export.exporter import Exporter
from node.export.sender import Destination
from node.runtime.config import Settings, load_settings


class ExportHarness:
    def __init__(self, data_dir: Path, destination: Destination, **sender: Any) -> None:
        self.settings: Settings = load_settings(None, storage={"data_dir": str(data_dir)}, sender=sender)
        self.store = AuditStore.open(self.settings.database_url)
        self.store.add_ae(
            destination.ae_title,
            host=destination.host,
            port=destination.port,
            role="destination",
            tls=destination.tls,
            actor="test",
        )
        self.destination = destination
        self.exporter = Exporter(self.settings, self.store)
        self._n = 0

    def register(self, files: Sequence[Path]) -> list[int]:
        """One instance whose results are `files`, each a pending export to the destination, due now."""
        self._n += 1
        inst = self.store.record_instance_received(
            ReceivedInstance(f"1.2.826.0.1.3680043.10.1.{self._n}", "1.2.840.10008.5.1.4.1.1.1")
        )
        return [
            self.store.create_export(
                inst.id, destination_ae=self.destination.ae_title, kind=f.stem, file_path=str(f)
            ).id
            for f in files
        ]

    def run(self, passes: int, *, between: Callable[[int], None] | None = None) -> int:
        """Exporter passes, each when the next export is due; `between(n)` runs before pass n > 1.
        Returns how many passes ran (fewer when nothing was pending any more)."""
        for n in range(1, passes + 1):
            pending = [e for e in self.store.list_exports() if e.state == ExportState.PENDING]
            if not pending:
                return n - 1
            if n > 1 and between is not None:
                between(n)
            # The last due time: exports scheduled by one attempt are a few ms apart; one pass sends them all.
            due = max(as_utc(e.next_attempt_at) for e in pending if e.next_attempt_at is not None)
            time.sleep(max(0.0, (due - utcnow()).total_seconds()))
            tried = self._attempt_count()
            deadline = time.monotonic() + 10
            while self._attempt_count() == tried:  # the due time is stored with the database's precision
                assert time.monotonic() < deadline, "the exporter made no attempt on a due export"
                self.exporter.run_once()
                if self._attempt_count() == tried:
                    time.sleep(0.05)
        return passes

    def _attempt_count(self) -> int:
        return sum(e.attempts for e in self.store.list_exports())

    def exports(self, ids: Sequence[int]) -> list[Export]:
        rows = {e.id: e for e in self.store.list_exports()}
        return [rows[i] for i in ids]

    def attempts(self, export_id: int) -> list[ExportAttempt]:
        return self.store.list_export_attempts(export_id)

    def delays(self, export_id: int) -> list[float]:
        """Seconds from each failed attempt to the retry it scheduled (the `export.retry` events' retry_at)."""
        attempts = self.attempts(export_id)
        retries = [e for e in self.store.list_events(kinds=["export.retry"]) if e.detail.get("export_id") == export_id]
        return [
            round(
                (
                    datetime.fromisoformat(e.detail["retry_at"]) - as_utc(attempts[e.detail["attempt"] - 1].finished_at)
                ).total_seconds(),
                1,
            )
            for e in retries
        ]

    def close(self) -> None:
        self.store.close()
