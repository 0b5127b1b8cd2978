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


def test_in_process_pipeline_runs_the_service_steps_in_batches(real_ct_images: dict[str, Path]) -> None:
    from types import SimpleNamespace

    from ctscan.calibration import IDENTITY
    from ctscan.imaging.preprocessing import LUNG_V1

    images = [path.read_bytes() for path in real_ct_images.values()]
    # What the pipeline reads of a served model (the registry's ServedModel has these fields).
    entry = SimpleNamespace(name="mobilenetv2", version="v1", input_size=64, preprocessing=LUNG_V1,
                            calibration=IDENTITY, threshold=0.5, gate=None, band=0.05)
    batches: list[tuple[int, ...]] = []

    def forward(batch: np.ndarray) -> np.ndarray:
        batches.append(batch.shape)
        return np.stack([np.full(len(batch), 0.7), np.full(len(batch), np.nan)], axis=1)

    rate = pipeline_images_per_s([entry], [forward], images, batch_size=4, total=10)
    assert rate > 0 and 0 < sum(shape[0] for shape in batches) <= 10  # slices without lungs are refused first
    assert all(shape[0] <= 4 and shape[1:] == (64, 64, 3) for shape in batches)


def _report(*, p50: float, rps: float, naive: float, rss_after: float) -> dict[str, object]:
    limits = {"p50_decode_plus_batch1_ms": 10.0, "batch1_ms": 8.0, "best_batch": 8, "backend": "onnxruntime",
              "best_images_per_s": 200.0, "pipeline_images_per_s": 150.0}
    models = ("inceptionv3", "densenet121", "mobilenetv2")
    return {
        "command": "python -m bench.run", "quick": False, "cpu_count": 2, "created_at": "2026-11-28T00:00:00",
        "load_average": [1.0, 1.0, 1.0],
        "in_process": {m: limits for m in (*models, "ensemble")}
        | {"study": {"slices_per_s": 20.0}},
        "service": {m: {"c1": {"p50_ms": p50}, "c16": {"throughput_rps": rps}} for m in (*models, "ensemble")},
        "study_service": {"slices": 150, "seconds": 8.0, "slices_per_s": 18.75},
        "naive": {m: {"throughput_rps": naive} for m in models},
        "http_floor": {"p50_ms": 2.0},
        "rss_after_warmup_mb": 1000.0,
        "soak": {"requests": 2000, "errors": 0, "throughput_rps": 50.0, "rss_before_mb": 1000.0,
                 "rss_after_mb": rss_after},
    }


def test_table_reports_ratios_against_the_in_process_pipeline() -> None:
    table = render(_report(p50=14.4, rps=140.0, naive=14.0, rss_after=1050.0))
    row = next(line for line in table.splitlines() if line.startswith("| mobilenetv2 | onnxruntime"))
    assert "| 10.0 | 12.0 | 14.4 | 1.20 (met) |" in row  # decode + batch 1 + the HTTP floor
    row = next(line for line in table.splitlines() if line.startswith("| ensemble | 200 (batch 8)"))
    assert "| 150 | 140 | 0.93 (met) | – | – |" in row
    assert "| 150 | 8.0 | 18.8 | 20.0 | 0.94 (met) |" in table  # the whole study
    assert "+5.0 %" in table and "≤ 10 %: met" in table and "load average 1.00" in table


def test_table_says_which_targets_are_missed() -> None:
    table = render(_report(p50=16.8, rps=100.0, naive=20.0, rss_after=1200.0))
    assert "1.40 (**missed**)" in table and "0.67 (**missed**)" in table
    assert "+20.0 %" in table and "≤ 10 %: **missed**" in table
