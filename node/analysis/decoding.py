"""Prepare (decode) images in a separate process with a memory limit, so one image can fail, never the node.

Decoders are C code fed with what a peer sent: a few kB of JPEG 2000 can ask for gigabytes, a malformed
codestream can crash the decoder. :func:`node.analysis.prepare.prepare` refuses what the header already shows
(the decoded size, a codestream that describes another image); the decode itself runs here, in a child
process whose address space is capped (``RLIMIT_AS`` = ``prepare.decode_memory_mb``) and whose time is
bounded (``prepare.decode_timeout_s``). Running out of memory, crashing or taking too long fails that one
image with a :class:`~node.analysis.prepare.PrepareError` (final), and the next image gets a fresh process.

One small pool per process, started at first use with ``spawn`` (no lock or thread of the node is
inherited); ``prepare.decode_memory_mb = 0`` decodes in the calling process instead.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING

from node.runtime.config import Settings

if TYPE_CHECKING:
    from node.analysis.prepare import Prepared

log = logging.getLogger(__name__)

MIB = 1024 * 1024
POOL_PROCESSES = 2  # the publisher and a console thumbnail at once

_lock = threading.Lock()
_pools: dict[int, ProcessPoolExecutor] = {}  # address-space limit in bytes -> pool


def prepare_isolated(settings: Settings, source: Path | str, long_side: int = 1024) -> Prepared:
    """:func:`node.analysis.prepare.prepare` in a memory-limited child process (see the module docstring).

    Raises PrepareError (the image's fault: final) or OSError (the file cannot be read).
    """
    # Imported here, not at the top: a decoder child imports this module for `_limit_memory`, and must
    # not load numpy (and its thread pools) before its limits are set.
    from node.analysis.prepare import PrepareError, prepare

    cfg = settings.prepare
    max_pixel_bytes = cfg.max_pixel_mb * MIB
    if cfg.decode_memory_mb == 0:
        return prepare(source, long_side, max_pixel_bytes=max_pixel_bytes)
    limit = cfg.decode_memory_mb * MIB
    for attempt in (1, 2):  # a pool broken before this image (a child that died idle) is replaced once
        pool = _pool(limit)
        try:
            future = pool.submit(prepare, str(source), long_side, max_pixel_bytes=max_pixel_bytes)
            return future.result(timeout=cfg.decode_timeout_s)
        except MemoryError as e:
            raise PrepareError(f"decoding needs more than prepare.decode_memory_mb {cfg.decode_memory_mb} MB") from e
        except BrokenProcessPool as e:
            _discard(limit, pool)
            if attempt == 2:
                raise PrepareError("the decoder process died on this image (crash, or killed for memory)") from e
        except FutureTimeout as e:
            _discard(limit, pool, kill=True)
            raise PrepareError(f"decoding took longer than prepare.decode_timeout_s {cfg.decode_timeout_s:g} s") from e
    raise AssertionError("unreachable")


def shutdown() -> None:
    """Stop every decoder process of this process, and wait for them. A process started by
    multiprocessing (a listener) must call it before it returns: its exit joins its children before it
    would tell the pool's workers to stop, and waits for ever."""
    with _lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


def _pool(limit: int) -> ProcessPoolExecutor:
    with _lock:
        pool = _pools.get(limit)
        if pool is None:
            pool = ProcessPoolExecutor(
                POOL_PROCESSES,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_limit_memory,
                initargs=(limit,),
            )
            _pools[limit] = pool
        return pool


def _discard(limit: int, pool: ProcessPoolExecutor, *, kill: bool = False) -> None:
    with _lock:
        if _pools.get(limit) is pool:
            del _pools[limit]
    if kill:  # a decoder stuck in C code does not see a cancel
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()
    pool.shutdown(wait=False, cancel_futures=True)
    log.warning("decoder processes replaced")


def _limit_memory(limit: int) -> None:
    """In the child, before numpy is imported: cap the address space, one thread for the numeric
    libraries (each thread's buffers count against the cap; on a many-core host they would fill it)."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
