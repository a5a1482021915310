"""Decompression bombs against a running node (issue 13, finding 1): one image fails, never the node.

- a Deflated data set of ~0.3 MB that inflates to 256 MB is refused (0xA700) while it is inflated in a
  stream, capped at storage.max_instance_mb, instead of inflated whole in the node's memory;
- a 4 kB JPEG 2000 data set declaring 12000 x 12000 pixels is stored, then `failed` with the reason
  before anything is decoded (prepare.max_pixel_mb), and its console thumbnail is not drawn;
- the same codestream under Rows/Columns 1024 fails on the codestream header check;
- a valid image sent afterwards is still prepared and published.
The node's RSS is read from /proc while it happens.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from node.audit import InstanceState
from tests.support.console import logged_in_console
from tests.support.dcmtk import send_as_stored
from tests.support.net import wait_for
from tests.support.node import NodeProcess
from tests.support.paths import dicom_dir
from tests.support.poison import deflate_bomb, j2k_bomb

pytestmark = pytest.mark.timeout(240)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_decompression_bombs_fail_their_image_and_never_the_node(tmp_path: Path) -> None:
    bombs = tmp_path / "bombs"
    deflated, j2k, j2k_lying = deflate_bomb(bombs), j2k_bomb(bombs), j2k_bomb(bombs, rows_cols=1024)
    node = NodeProcess(
        tmp_path, extra_toml="[broker]\nembedded_worker = false\n", storage_toml="max_instance_mb = 64"
    ).start()
    assert node.proc is not None
    store = node.store()
    peak = [rss_mb(node.proc.pid)]
    try:
        assert send_as_stored(node.port, deflated) == 0xA700
        peak.append(rss_mb(node.proc.pid))
        (refused,) = [i for i in store.list_instances() if i.state == InstanceState.REJECTED]
        assert "inflates to more than" in refused.reason and "max_instance_mb" in refused.reason

        assert send_as_stored(node.port, j2k) == 0x0000  # well formed: stored, then never decoded
        assert send_as_stored(node.port, j2k_lying) == 0x0000
        assert send_as_stored(node.port, dicom_dir() / "17_cr_j2k_lossless_12bit.dcm") == 0x0000

        def settled() -> bool:
            peak.append(rss_mb(node.proc.pid))  # type: ignore[union-attr]
            rows = [i for i in store.list_instances() if i.state != InstanceState.REJECTED]
            return (
                len(rows) == 3
                and sum(r.state == InstanceState.FAILED for r in rows) == 2
                and bool(store.list_events(kinds=["analysis.published"]))
            )

        wait_for(settled, 90, "the bombs to fail and the valid image to be published")
        by_size = {r.sop_instance_uid: r for r in store.list_instances()}
        failed = [r for r in by_size.values() if r.state == InstanceState.FAILED]
        reasons = sorted(r.reason for r in failed)
        assert len(failed) == 2, reasons
        assert "codestream is 12000 x 12000" in reasons[0] and "prepare.max_pixel_mb 100" in reasons[1], reasons
        assert len(store.list_events(kinds=["analysis.published"])) == 1  # the valid image
        assert max(peak) - peak[0] < 150, peak  # nothing was inflated or decoded in the node
    finally:
        assert node.stop() == 0, node.log_text()[-3000:]

    # The console does not decode the bomb for its thumbnail either.
    try:
        with logged_in_console(node, store) as client:
            for row in failed:
                assert client.get(f"/instances/{row.id}/overlay.png").status_code != 200
    finally:
        node.close()
