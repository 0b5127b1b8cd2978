"""FastAPI dependencies of the inference service (override them in tests)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ctscan.settings import InferenceSettings
from services.inference.metrics import InferenceMetrics
from services.inference.registry import ModelRegistry


def get_settings(request: Request) -> InferenceSettings:
    settings: InferenceSettings = request.app.state.settings
    return settings


def get_registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


def get_metrics(request: Request) -> InferenceMetrics:
    metrics: InferenceMetrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[InferenceSettings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated[InferenceMetrics, Depends(get_metrics)]
