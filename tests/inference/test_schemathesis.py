"""Property-based fuzzing of the OpenAPI schema: no input may produce a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from inference.conftest import RunningService


@pytest.fixture(scope="module")
def api_schema(inference_service: RunningService) -> schemathesis.schemas.BaseSchema:
    return schemathesis.openapi.from_url(inference_service.url + "/openapi.json")


def test_openapi_fuzzing_finds_no_server_error(api_schema: schemathesis.schemas.BaseSchema,
                                                inference_service: RunningService) -> None:
    failures: list[str] = []
    checked = 0
    for operation in api_schema.get_all_operations():
        api_operation = operation.ok()

        @settings(max_examples=60, deadline=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck), derandomize=True)
        @given(case=api_operation.as_strategy())
        def run(case: schemathesis.Case) -> None:
            nonlocal checked
            response = case.call(timeout=60, headers=inference_service.headers)
            checked += 1
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} -> {response.status_code}: {response.text[:200]}")

        run()
    assert checked >= 50
    assert not failures, failures
