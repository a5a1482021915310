"""node.export.sender.backoff_delay: exponential from the configured start, capped."""

from __future__ import annotations

import pytest

from node.export.sender import FileStatus, backoff_delay
from node.runtime.config import SenderConfig


def test_backoff_is_exponential_and_capped() -> None:
    cfg = SenderConfig(backoff_initial_s=5, backoff_factor=2, backoff_max_s=60)
    assert [backoff_delay(n, cfg) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]
    assert backoff_delay(1000, cfg) == 60
    with pytest.raises(ValueError):
        backoff_delay(0, cfg)


def test_default_schedule() -> None:
    cfg = SenderConfig()
    assert [backoff_delay(n, cfg) for n in range(1, cfg.max_attempts)] == [5, 10, 20, 40, 80]


@pytest.mark.parametrize(
    ("status", "ok", "retryable"),
    [
        (0x0000, True, False),
        (0xB007, True, False),
        (0xA700, False, True),
        (0xA900, False, False),
        (0xC000, False, False),
        (0x0122, False, False),
    ],
)
def test_status_classes(status: int, ok: bool, retryable: bool) -> None:
    s = FileStatus("1.2.3", "1.2.840.10008.5.1.4.1.1.66.4", status, None if ok else "refused")
    assert (s.ok, s.retryable) == (ok, retryable)
