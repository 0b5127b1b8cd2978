"""The decode pool: single uploads before study slices, large slices on their own threads,
and a bounded queue that refuses at once when full."""

from __future__ import annotations

import threading

import pytest

from services.inference.decoding import SINGLE, STUDY, DecodePool, DecodeQueueFullError


def _blocked_pool(**options: int) -> tuple[DecodePool, threading.Event]:
    pool = DecodePool(workers=1, heavy_pixels=1000, **{"max_waiting": 16, **options})
    release = threading.Event()
    started = threading.Event()

    def block() -> None:
        started.set()
        release.wait(10)

    pool.submit(block)
    assert started.wait(10)  # the only ordinary thread is busy from here on
    return pool, release


def test_single_uploads_go_before_the_slices_of_studies() -> None:
    pool, release = _blocked_pool()
    order: list[str] = []
    futures = [pool.submit(order.append, f"study-{n}", priority=STUDY) for n in range(3)]
    futures.append(pool.submit(order.append, "single", priority=SINGLE))
    release.set()
    for future in futures:
        future.result(10)
    assert order == ["single", "study-0", "study-1", "study-2"]
    pool.shutdown()


def test_large_slices_do_not_wait_for_ordinary_threads() -> None:
    pool, release = _blocked_pool()
    assert pool.submit(lambda: "large", pixels=5000).result(10) == "large"  # its own thread
    ordinary = pool.submit(lambda: "ordinary", pixels=500)
    assert not ordinary.done()
    release.set()
    assert ordinary.result(10) == "ordinary"
    pool.shutdown()


def test_a_full_queue_refuses_at_once_with_a_retry_time() -> None:
    pool, release = _blocked_pool(max_waiting=2)
    waiting = [pool.submit(lambda: None), pool.submit(lambda: None)]
    with pytest.raises(DecodeQueueFullError, match="busy") as refused:
        pool.submit(lambda: None)
    assert refused.value.retry_after_s >= 1 and pool.waiting == 2
    release.set()
    for future in waiting:
        future.result(10)
    assert pool.waiting == 0
    pool.submit(lambda: None).result(10)  # room again
    pool.shutdown()


def test_failures_reach_the_caller() -> None:
    pool = DecodePool(workers=1, max_waiting=4, heavy_pixels=1000)

    def broken() -> None:
        raise ValueError("bad slice")

    with pytest.raises(ValueError, match="bad slice"):
        pool.submit(broken).result(10)
    pool.shutdown()
