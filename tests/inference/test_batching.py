"""The dynamic batcher groups concurrent requests, keeps answers in order and fails cleanly."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from services.inference.batching import BatcherClosedError, DynamicBatcher


def _sum_model(sizes: list[int], delay: float = 0.0):  # type: ignore[no-untyped-def]
    def predict(batch: np.ndarray) -> np.ndarray:
        sizes.append(len(batch))
        time.sleep(delay)
        return batch.reshape(len(batch), -1).mean(axis=1) / 255.0
    return predict


def test_concurrent_requests_share_forward_passes_and_get_their_own_answer() -> None:
    sizes: list[int] = []
    batcher = DynamicBatcher(_sum_model(sizes, delay=0.05), name="t", max_batch_size=8, max_wait_s=0.05)
    images = [np.full((4, 4, 3), value, np.float32) for value in range(0, 255, 8)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda image: batcher.submit(image).result(timeout=10), images))
    batcher.close(wait=True)
    assert answers == pytest.approx([float(image.mean()) / 255.0 for image in images])
    assert max(sizes) > 1 and max(sizes) <= 8 and sum(sizes) == len(images)


def test_lone_request_waits_at_most_max_wait() -> None:
    sizes: list[int] = []
    batcher = DynamicBatcher(_sum_model(sizes), name="t", max_batch_size=64, max_wait_s=0.02)
    started = time.monotonic()
    batcher.submit(np.zeros((2, 2, 3), np.float32)).result(timeout=5)
    assert time.monotonic() - started < 1.0 and sizes == [1]
    batcher.close(wait=True)


def test_a_failing_batch_fails_its_requests_and_the_batcher_goes_on() -> None:
    calls = []

    def flaky(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("backend hiccup")
        return np.zeros(len(batch), np.float32)

    batcher = DynamicBatcher(flaky, name="t", max_batch_size=1, max_wait_s=0.0)
    with pytest.raises(RuntimeError, match="hiccup"):
        batcher.submit(np.zeros((2, 2, 3), np.float32)).result(timeout=5)
    assert batcher.submit(np.zeros((2, 2, 3), np.float32)).result(timeout=5) == 0.0
    batcher.close(wait=True)


def test_close_finishes_queued_work_then_refuses_more() -> None:
    gate = threading.Event()

    def slow(batch: np.ndarray) -> np.ndarray:
        gate.wait(5)
        return np.ones(len(batch), np.float32)

    batcher = DynamicBatcher(slow, name="t", max_batch_size=2, max_wait_s=0.0)
    futures = [batcher.submit(np.zeros((2, 2, 3), np.float32)) for _ in range(5)]
    batcher.close()
    with pytest.raises(BatcherClosedError):
        batcher.submit(np.zeros((2, 2, 3), np.float32))
    gate.set()
    assert [f.result(timeout=10) for f in futures] == [1.0] * 5


@pytest.mark.parametrize(("size", "wait"), [(0, 0.01), (4, -1.0)])
def test_bad_configuration_is_refused(size: int, wait: float) -> None:
    with pytest.raises(ValueError):
        DynamicBatcher(lambda b: b, name="t", max_batch_size=size, max_wait_s=wait)


def test_a_lone_announced_request_does_not_wait_for_the_batch_window() -> None:
    sizes: list[int] = []
    batcher = DynamicBatcher(_sum_model(sizes), name="t", max_batch_size=16, max_wait_s=2.0)
    arrival = batcher.expect()
    started = time.monotonic()
    assert arrival.submit(np.zeros((2, 2, 3), np.float32)).result(timeout=5) == 0.0
    assert time.monotonic() - started < 1.0 and sizes == [1]  # far below the 2 s window
    batcher.close(wait=True)


def test_a_batch_waits_for_requests_that_are_still_decoding() -> None:
    sizes: list[int] = []
    batcher = DynamicBatcher(_sum_model(sizes), name="t", max_batch_size=16, max_wait_s=2.0)
    first, second = batcher.expect(), batcher.expect()
    future = first.submit(np.zeros((2, 2, 3), np.float32))
    time.sleep(0.2)  # the second one is still "decoding"; the batch must not have run yet
    assert sizes == [] and not future.done()
    second.submit(np.ones((2, 2, 3), np.float32))
    assert future.result(timeout=5) == 0.0 and sizes == [2]
    batcher.close(wait=True)


def test_a_request_that_fails_to_decode_stops_being_waited_for() -> None:
    sizes: list[int] = []
    batcher = DynamicBatcher(_sum_model(sizes), name="t", max_batch_size=16, max_wait_s=5.0)
    first = batcher.expect()
    with batcher.expect():  # leaves the block without pixels, like a request whose image is broken
        future = first.submit(np.zeros((2, 2, 3), np.float32))
        time.sleep(0.1)
        assert not future.done()
    assert future.result(timeout=2) == 0.0 and sizes == [1]  # well before the 5 s window
    with pytest.raises(RuntimeError):
        first.submit(np.zeros((2, 2, 3), np.float32))  # an arrival submits once
    batcher.close(wait=True)


def test_the_batch_window_bounds_the_wait_for_announced_requests() -> None:
    sizes: list[int] = []
    batcher = DynamicBatcher(_sum_model(sizes), name="t", max_batch_size=16, max_wait_s=0.1)
    first, _never = batcher.expect(), batcher.expect()
    started = time.monotonic()
    first.submit(np.zeros((2, 2, 3), np.float32)).result(timeout=5)
    assert 0.09 <= time.monotonic() - started < 2.0 and sizes == [1]
    batcher.close(wait=True)
