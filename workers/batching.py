"""Micro-batching for GPU workers with a thread pool: concurrent requests of one model share a pass."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from workers.backends import Prediction


@dataclass
class _Pending:
    x: np.ndarray
    result: Prediction | None = None
    error: BaseException | None = None
    done: bool = False


class MicroBatcher:
    """Runs concurrent `predict` calls of one model together, up to `max_batch` images per pass.

    For GPU workers with a thread pool (`--pool threads -c 8`): each task thread submits its images;
    whichever thread gets the model next runs everything queued by then in one forward pass and hands
    each caller its rows. No timer: while one pass runs, the next callers queue up, so batches grow
    with load and a lone request never waits.
    """

    def __init__(self, run: Callable[[np.ndarray], Prediction], max_batch: int) -> None:
        self.run = run
        self.max_batch = max_batch
        self._queue: deque[_Pending] = deque()
        self._queue_lock = threading.Lock()
        self._run_lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> Prediction:
        mine = _Pending(x)
        with self._queue_lock:
            self._queue.append(mine)
        while not mine.done:
            with self._run_lock:
                if mine.done:  # another thread ran it while we waited
                    break
                self._run_queued()
        if mine.error is not None:
            raise mine.error
        assert mine.result is not None
        return mine.result

    def _run_queued(self) -> None:
        taken: list[_Pending] = []
        with self._queue_lock:
            n = 0
            while self._queue and (not taken or n + len(self._queue[0].x) <= self.max_batch):
                item = self._queue.popleft()
                taken.append(item)
                n += len(item.x)
        try:
            pred = self.run(np.concatenate([t.x for t in taken]))
            start = 0
            for t in taken:
                stop = start + len(t.x)
                t.result = Prediction(
                    mask=pred.mask[start:stop], presence=None if pred.presence is None else pred.presence[start:stop]
                )
                start = stop
        except BaseException as exc:  # noqa: BLE001 — every caller of this pass sees the failure
            for t in taken:
                t.error = exc
        finally:
            for t in taken:
                t.done = True
