"""Poison instances (issue 13, finding 4): values that break preparation end `failed` with the reason,
audited and shown in the console, after a bounded number of attempts; never `queued` for ever.

Sent to a running `cxrnode serve` (analysis pipeline on, no inference worker: a poison instance fails
before it would be published).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from node.audit import InstanceFilter, InstanceState
from tests.support.console import logged_in_console
from tests.support.dcmtk import send_as_stored
from tests.support.net import wait_for
from tests.support.node import NodeProcess
from tests.support.poison import poison_files

pytestmark = pytest.mark.timeout(180)


def test_poison_instances_fail_once_with_the_reason_audited_and_in_the_console(tmp_path: Path) -> None:
    files = poison_files(tmp_path / "poison")
    node = NodeProcess(tmp_path, extra_toml="[broker]\nembedded_worker = false\n")
    node.start()
    try:
        for name, path in files.items():
            assert send_as_stored(node.port, path) == 0x0000, name  # well formed enough to be stored
        store = node.store()

        def all_failed() -> bool:
            rows = store.list_instances()
            return len(rows) == len(files) and all(r.state == InstanceState.FAILED for r in rows)

        wait_for(all_failed, 60, "every poison instance to fail")
        rows = store.list_instances()
        for row in rows:
            assert row.reason.startswith("cannot prepare pixels:"), row.reason
        # Final: one instance.failed each, and no further attempts after a sweep or two (5 s apart).
        time.sleep(12)
        failed = store.list_events(kinds=["instance.failed"])
        assert sorted(e.instance_id for e in failed) == sorted(r.id for r in rows)
        assert not store.list_events(kinds=["analysis.published"])
        assert all(r.state == InstanceState.FAILED for r in store.list_instances())
    finally:
        assert node.stop() == 0, node.log_text()[-3000:]

    # The console lists them as failed and shows each reason on the study page.
    try:
        with logged_in_console(node, store) as client:
            listing = client.get("/studies", state="failed").text
            for row in store.list_instances(InstanceFilter(states=[InstanceState.FAILED])):
                assert f"/studies/{row.study_id}" in listing
                page = client.get(f"/studies/{row.study_id}").text
                assert "cannot prepare pixels" in page and "failed" in page
    finally:
        node.close()
