"""Dynamic batching: concurrent requests for one model share a forward pass.

A batch closes when it holds `max_batch_size` images or `max_wait_s` after its first image
arrived, whichever comes first; a lone request therefore waits at most `max_wait_s`. One
worker thread per model version runs the batches, so ONNX Runtime / TensorFlow use their
own thread pools without contention from other batches of the same model.
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


@dataclass
class _Pending:
    pixels: np.ndarray
    future: Future[float]


class BatcherClosedError(RuntimeError):
    """The model version behind this batcher has been retired."""


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
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, pixels: np.ndarray) -> Future[float]:
        """Queue one (S, S, 3) image; the future resolves to its probability."""
        future: Future[float] = Future()
        with self._lock:
            if self._closed:
                raise BatcherClosedError(f"batcher {self.name} is closed")
            self._queue.put(_Pending(pixels, future))
        return future

    async def predict(self, pixels: np.ndarray) -> float:
        return await asyncio.wrap_future(self.submit(pixels))

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
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch, stopping = self._collect(first)
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                probabilities = self._predict(np.stack([p.pixels for p in live]).astype(np.float32))
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
            for pending, probability in zip(live, probabilities, strict=True):
                pending.future.set_result(float(probability))
