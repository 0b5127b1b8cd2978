"""Where uploads are decoded, screened and preprocessed: a bounded pool of threads.

One thread per core takes ordinary slices (a CT matrix up to 1024 x 1024) in order of
priority: single uploads before the slices of whole studies, so a 500-slice study does not
make a clinician's one slice wait behind it. Larger slices (up to the configured pixel
limit) go to their own few threads, a share of the cores at a lower CPU priority, so a burst
of them slows ordinary uploads by at most that share instead of stopping them. Waiting work is bounded: beyond
`max_waiting` an upload is refused at once (`DecodeQueueFullError`, HTTP 503 with
Retry-After) instead of queueing behind minutes of work and memory.

Decoding is numpy, PIL, scipy and codecs, which release the GIL for their heavy loops; the
event loop keeps answering while every core decodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

SINGLE = 0  # one slice: a person is waiting for it
STUDY = 1  # a slice of a whole study


class DecodeQueueFullError(RuntimeError):
    """Too much decoding is waiting: try again shortly (HTTP 503 with Retry-After)."""

    def __init__(self, waiting: int, retry_after_s: int) -> None:
        super().__init__(f"the service is busy decoding {waiting} uploads; try again in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class _Lane:
    """Threads taking jobs from one priority queue."""

    def __init__(self, name: str, workers: int, *, niceness: int = 0) -> None:
        self._niceness = niceness
        self._jobs: queue.PriorityQueue[tuple[int, int, Callable[[], None] | None]] = queue.PriorityQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{n}", daemon=True) for n in range(workers)]
        for thread in self._threads:
            thread.start()

    def put(self, priority: int, order: int, job: Callable[[], None]) -> None:
        self._jobs.put((priority, order, job))

    def _work(self) -> None:
        if self._niceness:
            with contextlib.suppress(OSError, AttributeError):  # Linux: a thread has its own nice value
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._niceness)
        while True:
            _, _, job = self._jobs.get()
            if job is None:
                return
            job()

    def stop(self, order: int) -> None:
        for _ in self._threads:
            self._jobs.put((1 << 30, order, None))  # after every queued job


class DecodePool:
    def __init__(self, *, workers: int, max_waiting: int, heavy_pixels: int, heavy_workers: int | None = None) -> None:
        self.workers = max(1, workers)
        self.max_waiting = max(1, max_waiting)
        self.heavy_pixels = heavy_pixels
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._waiting = 0
        self._ordinary = _Lane("decode", self.workers)
        # Lower CPU priority too: when the cores are short, ordinary slices get them first.
        self._heavy = _Lane("decode-large", heavy_workers or max(1, self.workers // 2), niceness=10)
        self._closed = False

    @property
    def waiting(self) -> int:
        """Jobs accepted and not started yet."""
        return self._waiting

    def submit(self, function: Callable[..., T], *args: Any, pixels: int | None = None, priority: int = SINGLE,
               **kwargs: Any) -> Future[T]:
        """Queue `function(*args, **kwargs)`; `pixels`, what the upload's header announces,
        picks the lane. Raises DecodeQueueFullError when too much is waiting already."""
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the decode pool is shut down")
            if self._waiting >= self.max_waiting:
                # About how long the backlog takes at ~20 ms a slice on every thread.
                raise DecodeQueueFullError(self._waiting, max(1, round(self._waiting * 0.02 / self.workers)))
            self._waiting += 1

        def job() -> None:
            with self._lock:
                self._waiting -= 1
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(function(*args, **kwargs))
            except BaseException as exc:  # handed to the awaiting request
                future.set_exception(exc)

        lane = self._heavy if pixels is not None and pixels > self.heavy_pixels else self._ordinary
        lane.put(priority, next(self._order), job)
        return future

    async def run(self, function: Callable[..., T], *args: Any, pixels: int | None = None, priority: int = SINGLE,
                  **kwargs: Any) -> T:
        return await asyncio.wrap_future(self.submit(function, *args, pixels=pixels, priority=priority, **kwargs))

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
        order = next(self._order)
        self._ordinary.stop(order)
        self._heavy.stop(order)
