"""Prometheus metrics of one inference app (own registry, so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class InferenceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "inference_requests_total", "Upload requests by model, HTTP status and action",
            ["model", "status", "action"], registry=self.registry)
        self.latency = Histogram(
            "inference_request_seconds", "Upload latency by model, HTTP status and action",
            ["model", "status", "action"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(
            "inference_batch_size", "Images per forward pass", ["model"],
            buckets=BATCH_BUCKETS, registry=self.registry)
        self.model_version = Gauge(
            "inference_model_version_info", "1 for the version (and backend) being served",
            ["model", "version", "backend"], registry=self.registry)
        self.reloads = Counter(
            "inference_model_reloads_total", "Hot reload attempts by outcome",
            ["model", "outcome"], registry=self.registry)
