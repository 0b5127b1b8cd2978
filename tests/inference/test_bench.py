"""The benchmark's own parts: the load generator against the real service, the in-process
pipeline and the README table (ratios and met/missed read off the numbers given)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.loadgen import run_load
from bench.run import pipeline_images_per_s, render

from .conftest import RunningService


def test_load_generator_drives_the_real_service(inference_service: RunningService,
                                                real_ct_images: dict[str, Path]) -> None:
    images = [path.read_bytes() for path in real_ct_images.values()]
    result = run_load(url=inference_service.url, api_key=inference_service.api_key,
                      model="mobilenetv2", images=images, concurrency=4, total=24)
    assert result.requests == 24 and result.errors == 0
    assert 0 < result.p50_ms <= result.p95_ms <= result.p99_ms and result.throughput_rps > 0


def test_load_generator_counts_refused_requests_as_errors(inference_service: RunningService,
                                                          real_ct_images: dict[str, Path]) -> None:
    images = [path.read_bytes() for path in real_ct_images.values()]
    unknown = run_load(url=inference_service.url, api_key=inference_service.api_key,
                       model="resnet50", images=images, concurrency=2, total=6, warmup=0)
    assert unknown.errors == 6
    broken = run_load(url=inference_service.url, api_key=inference_service.api_key,
                      model="mobilenetv2", images=[b"\x89PNG\r\n\x1a\nbroken"],
                      concurrency=2, total=4, warmup=0)
    assert broken.errors == 4
    assert inference_service.get("/healthz").status_code == 200


def test_in_process_pipeline_feeds_every_slice_in_batches(real_ct_images: dict[str, Path]) -> None:
    images = [path.read_bytes() for path in real_ct_images.values()]
    batches: list[tuple[int, ...]] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        batches.append(batch.shape)
        return np.zeros(len(batch), np.float32)

    rate = pipeline_images_per_s(predict, images, 64, batch_size=4, total=10)
    assert rate > 0 and sum(shape[0] for shape in batches) == 10
    assert [shape[0] for shape in batches] == [4, 4, 2] and batches[0][1:] == (64, 64, 3)


def _report(*, p50: float, rps: float, naive: float, rss_after: float) -> dict[str, object]:
    limits = {"p50_decode_plus_batch1_ms": 10.0, "batch1_ms": 8.0, "best_batch": 8,
              "best_images_per_s": 200.0, "pipeline_images_per_s": 150.0}
    slower = {**limits, "p50_decode_plus_batch1_ms": 20.0, "best_images_per_s": 50.0, "pipeline_images_per_s": 40.0}
    models = ("inceptionv3", "densenet121", "mobilenetv2")
    return {
        "command": "python -m bench.run", "quick": False, "cpu_count": 2, "created_at": "2026-11-28T00:00:00",
        "backends": dict.fromkeys(models, "onnxruntime"),
        "in_process": {m: {"onnxruntime": limits, "tensorflow": slower} for m in models},
        "service": {m: {"c1": {"p50_ms": p50}, "c16": {"throughput_rps": rps}} for m in models},
        "naive": {m: {"throughput_rps": naive} for m in models},
        "http_floor": {"p50_ms": 1.0},
        "rss_after_warmup_mb": 1000.0,
        "soak": {"requests": 2000, "errors": 0, "throughput_rps": 50.0, "rss_after_mb": rss_after},
    }


def test_table_reports_ratios_against_the_best_in_process_backend() -> None:
    table = render(_report(p50=12.0, rps=180.0, naive=15.0, rss_after=1050.0))
    row = next(line for line in table.splitlines() if line.startswith("| mobilenetv2 | onnxruntime"))
    assert "| 10.0 | 12.0 | 1.20 (met) | 1.10 |" in row  # the faster backend's floor, not TensorFlow's
    row = next(line for line in table.splitlines() if line.startswith("| mobilenetv2 | 200 (batch 8)"))
    assert "| 150 | 180 | 0.90 (met) | 1.20 | 15.0 | 12.0× (met) | 10.0× |" in row
    assert "+5.0 %" in table and "< 10 %: met" in table


def test_table_says_which_targets_are_missed() -> None:
    table = render(_report(p50=14.0, rps=100.0, naive=20.0, rss_after=1200.0))
    assert "1.40 (**missed**)" in table and "0.50 (**missed**)" in table and "5.0× (**missed**)" in table
    assert "+20.0 %" in table and "< 10 %: **missed**" in table
