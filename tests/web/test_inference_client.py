"""The inference client: timeouts, retries and friendly errors (against a real HTTP server)."""

from __future__ import annotations

import time

import pytest

from services.web.inference_client import (
    InferenceBusyError,
    InferenceClient,
    InferenceCredentialsError,
    InferenceError,
    InferenceRejectedError,
    InferenceTimeoutError,
    InferenceUnavailableError,
)

from .conftest import ContractServer, free_port, tiny_png


def test_predict_sends_model_and_explain(contract_server: ContractServer) -> None:
    client = InferenceClient(contract_server.url, read_timeout_s=5, retries=0)
    answer = client.predict(data=tiny_png(), filename="upload.png", model="densenet121", explain=False)
    assert answer.model == "densenet121"
    assert contract_server.requests_seen[0]["query"] == {"model": "densenet121", "explain": "false"}


def test_not_ready_is_retried_then_reported(contract_server: ContractServer) -> None:
    contract_server.mode = "notready"
    client = InferenceClient(contract_server.url, read_timeout_s=5, retries=2)
    with pytest.raises(InferenceUnavailableError, match="not ready"):
        client.predict(data=tiny_png(), filename="upload.png")
    assert len(contract_server.requests_seen) == 3  # first try and two retries


def test_slow_service_times_out_without_retrying(contract_server: ContractServer) -> None:
    contract_server.mode, contract_server.delay_s = "slow", 2.0
    client = InferenceClient(contract_server.url, read_timeout_s=0.5, retries=2)
    started = time.monotonic()
    with pytest.raises(InferenceTimeoutError, match="too long"):
        client.predict(data=tiny_png(), filename="upload.png")
    assert time.monotonic() - started < 1.5
    assert len(contract_server.requests_seen) == 1


def test_service_down_is_unavailable() -> None:
    client = InferenceClient(f"http://127.0.0.1:{free_port()}", connect_timeout_s=0.5, retries=1)
    with pytest.raises(InferenceUnavailableError, match="cannot be reached"):
        client.predict(data=tiny_png(), filename="upload.png")
    assert client.ready() is False


@pytest.mark.parametrize(("mode", "status"), [("reject415", 415), ("reject413", 413)])
def test_refusals_keep_their_status(contract_server: ContractServer, mode: str, status: int) -> None:
    contract_server.mode = mode
    client = InferenceClient(contract_server.url, retries=0)
    with pytest.raises(InferenceRejectedError) as caught:
        client.predict(data=tiny_png(), filename="upload.png")
    assert caught.value.status == status


def test_unreadable_answer_is_an_error(contract_server: ContractServer) -> None:
    contract_server.mode = "garbage"
    client = InferenceClient(contract_server.url, retries=0)
    with pytest.raises(InferenceError, match="could not be read"):
        client.predict(data=tiny_png(), filename="upload.png")


def test_the_pages_key_and_request_id_are_sent(contract_server: ContractServer) -> None:
    client = InferenceClient(contract_server.url, retries=0, api_key="ctk_page-key-for-this-test-0123")
    client.predict(data=tiny_png(), filename="upload.png", request_id="web-req-0001")
    client.predict_study(files=[tiny_png(), tiny_png()], request_id="web-req-0002")
    headers = [seen["headers"] for seen in contract_server.requests_seen]
    assert [h["X-API-Key"] for h in headers] == ["ctk_page-key-for-this-test-0123"] * 2
    assert [h["X-Request-ID"] for h in headers] == ["web-req-0001", "web-req-0002"]


def test_without_a_key_none_is_sent(contract_server: ContractServer) -> None:
    InferenceClient(contract_server.url, retries=0).predict(data=tiny_png(), filename="upload.png")
    assert "X-API-Key" not in contract_server.requests_seen[0]["headers"]


def test_a_refused_key_tells_the_clinician_whom_to_call(contract_server: ContractServer) -> None:
    contract_server.mode = "unauthorised"
    client = InferenceClient(contract_server.url, retries=2, api_key="ctk_revoked-page-key-0123456789")
    with pytest.raises(InferenceCredentialsError) as caught:
        client.predict(data=tiny_png(), filename="upload.png")
    assert str(caught.value) == "The analysis service refused this page's credentials; tell the service desk."
    assert caught.value.status == 502 and caught.value.outcome == "unauthorised"
    assert len(contract_server.requests_seen) == 1  # a wrong key is not retried
    with pytest.raises(InferenceCredentialsError):
        client.predict_study(files=[tiny_png()])


def test_rate_limited_says_when_to_try_again(contract_server: ContractServer) -> None:
    contract_server.mode = "busy"
    client = InferenceClient(contract_server.url, retries=2, api_key="ctk_busy-page-key-0123456789")
    with pytest.raises(InferenceBusyError) as caught:
        client.predict(data=tiny_png(), filename="upload.png")
    assert str(caught.value) == "Too many requests: please wait 7 s before you try again."
    assert caught.value.retry_after_s == 7 and caught.value.outcome == "rate_limited"
    assert len(contract_server.requests_seen) == 1
