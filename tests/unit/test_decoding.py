"""node.analysis.decoding: a decode that needs too much memory or time fails its image, not the calling process."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.analysis import decoding
from node.analysis.prepare import PrepareError
from node.runtime.config import load_settings
from tests.support.paths import dicom_dir
from tests.support.poison import j2k_bomb

VALID = dicom_dir() / "02_cr_implicit_le_12bit.dcm"


@pytest.fixture(autouse=True)
def _fresh_pools() -> Iterator[None]:
    yield
    decoding.shutdown()


def test_a_bomb_past_the_size_cap_fails_in_the_child_within_its_memory_limit(tmp_path: Path) -> None:
    # The decoded-size cap raised out of the way: only the child's address-space limit stops the decode.
    settings = load_settings(None, prepare={"max_pixel_mb": 4000, "decode_memory_mb": 700})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(PrepareError):
        decoding.prepare_isolated(settings, j2k_bomb(tmp_path))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB: not decoded here
    assert decoding.prepare_isolated(settings, VALID).pixels.shape == (1024, 1024)  # the next image is fine


def test_a_decode_past_its_time_limit_fails_and_the_next_one_gets_a_fresh_process() -> None:
    slow = load_settings(None, prepare={"decode_timeout_s": 0.001})
    with pytest.raises(PrepareError, match="decode_timeout_s"):
        decoding.prepare_isolated(slow, VALID)
    assert decoding.prepare_isolated(load_settings(None), VALID).pixels.shape == (1024, 1024)


def test_zero_memory_limit_decodes_in_process() -> None:
    settings = load_settings(None, prepare={"decode_memory_mb": 0})
    assert decoding.prepare_isolated(settings, VALID).pixels.shape == (1024, 1024)
    assert not decoding._pools


def test_a_decoder_that_died_idle_is_replaced_without_failing_the_next_image() -> None:
    settings = load_settings(None)
    assert decoding.prepare_isolated(settings, VALID).pixels.shape == (1024, 1024)
    (pool,) = decoding._pools.values()
    for proc in list(pool._processes.values()):  # type: ignore[attr-defined]
        proc.kill()
        proc.join(5)
    assert decoding.prepare_isolated(settings, VALID).pixels.shape == (1024, 1024)
