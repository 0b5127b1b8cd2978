"""Dynamic batching: concurrent requests for one model share a forward pass.

Requests announce themselves (`expect`) when they start decoding, before their pixels are
ready. A batch takes what is queued and then waits, at most `max_wait_s` after its first
image, only for requests that are announced and still on their way; it closes at
`max_batch_size`. A lone request therefore never waits, and under load batches fill up
with requests that are still decoding. One worker thread per model version runs the
batches, so ONNX Runtime / TensorFlow use their own thread pools without contention from
other batches of the same model.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

BatchPredict = Callable[[np.ndarray], np.ndarray]
Result = float | tuple[float, ...]  # an image's output: a probability, or a row (probability, distance)


@dataclass
class _Pending:
    pixels: np.ndarray
    future: Future[Result]


_WAKE = object()  # queued when an announced request leaves, so a waiting batch rechecks


class BatcherClosedError(RuntimeError):
    """The model version behind this batcher has been retired."""


class Arrival:
    """A request on its way to the batcher: `submit` its pixels once, or leave (`cancel`)."""

    def __init__(self, batcher: DynamicBatcher) -> None:
        self._batcher = batcher
        self._pending = True

    def submit(self, pixels: np.ndarray) -> Future[Result]:
        if not self._pending:
            raise RuntimeError("this arrival was already submitted or cancelled")
        self._pending = False
        return self._batcher._put(pixels, announced=True)

    async def predict(self, pixels: np.ndarray) -> Result:
        return await asyncio.wrap_future(self.submit(pixels))

    def cancel(self) -> None:
        """The request failed before it had pixels (bad image): stop waiting for it."""
        if self._pending:
            self._pending = False
            self._batcher._withdraw()

    def __enter__(self) -> Arrival:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()


class DynamicBatcher:
    def __init__(
        self,
        predict: BatchPredict,
        *,
        name: str,
        max_batch_size: int,
        max_wait_s: float,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s}")
        self.name = name
        self._predict = predict
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._queue: queue.Queue[_Pending | object | None] = queue.Queue()
        self._closed = False
        self._incoming = 0  # announced requests not yet queued
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def expect(self) -> Arrival:
        """Announce a request whose pixels are still being decoded; batches wait for it."""
        with self._lock:
            if self._closed:
                raise BatcherClosedError(f"batcher {self.name} is closed")
            self._incoming += 1
        return Arrival(self)

    def submit(self, pixels: np.ndarray) -> Future[Result]:
        """Queue one (S, S, 3) image; the future resolves to its probability."""
        return self._put(pixels, announced=False)

    def _put(self, pixels: np.ndarray, *, announced: bool) -> Future[Result]:
        future: Future[Result] = Future()
        with self._lock:
            if announced:
                self._incoming -= 1
            if self._closed:
                raise BatcherClosedError(f"batcher {self.name} is closed")
            self._queue.put(_Pending(pixels, future))
        return future

    def _withdraw(self) -> None:
        with self._lock:
            self._incoming -= 1
            self._queue.put(_WAKE)

    def close(self, *, wait: bool = False) -> None:
        """Finish every queued request, then stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        if wait:
            self._thread.join()

    def _collect(self, first: _Pending) -> tuple[list[_Pending], bool]:
        batch = [first]
        deadline = time.monotonic() + self._max_wait_s
        while len(batch) < self._max_batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if self._incoming <= 0 or remaining <= 0:  # nothing on its way, or waited enough
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is None:
                return batch, True
            if isinstance(item, _Pending):
                batch.append(item)
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            if not isinstance(first, _Pending):  # a wake-up with no batch waiting
                continue
            batch, stopping = self._collect(first)
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                probabilities = self._predict(np.stack([p.pixels for p in live]).astype(np.float32, copy=False))
                if probabilities.shape[0] != len(live):
                    raise RuntimeError(f"{self.name}: {probabilities.shape[0]} outputs for "
                                       f"{len(live)} images")
            except Exception as exc:  # hand the failure to every waiting request
                logger.exception("batch of %d failed on %s", len(live), self.name)
                for pending in live:
                    pending.future.set_exception(exc)
                continue
            if self._on_batch is not None:
                self._on_batch(len(live))
            for pending, row in zip(live, probabilities, strict=True):
                # One output per image (a probability), or a row of them (a tuple).
                pending.future.set_result(float(row) if np.ndim(row) == 0 else tuple(float(v) for v in row))
