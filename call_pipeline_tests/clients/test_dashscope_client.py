"""The DashScope wrapper through the real `dashscope` SDK against the simulator."""

import threading
import time

import pytest

from call_pipeline.clients.dashscope_llm import LEAD, OUTAGE, LlmClient, LlmError, classify_failure
from call_pipeline.clients.limits import SharedSemaphore
from call_pipeline.resources import DashScopeResource

MESSAGES = [
    {"role": "system",
     "content": "只输出JSON：{leads_remark, is_interested, next_follow_time}。当前时间：2026-11-28 10:00:00"},
    {"role": "user", "content": "<transcript>\n机器人: 您好\n客户: 我想问下价格，明天下午可以试驾吗\n</transcript>"},
]


def make_client(simulator, tmp_path, **overrides) -> LlmClient:
    settings = DashScopeResource(api_key="sk-test-secret", base_http_api_url=simulator.dashscope_base_url,
                           request_timeout_s=overrides.pop("request_timeout_s", 2.0), backoff_s=0.01,
                           max_backoff_s=0.05, **overrides).client_config()
    return LlmClient(settings, SharedSemaphore(f"llm-{simulator.port}", settings.max_concurrency, tmp_path))


def test_generation_returns_the_models_text(simulator, tmp_path):
    text = make_client(simulator, tmp_path).complete(MESSAGES)
    assert '"is_interested"' in text
    body = simulator.state.llm_requests[-1]
    assert body["model"] == "qwen-plus"
    assert body["parameters"]["response_format"] == {"type": "json_object"}


def test_bailian_app_is_used_when_an_app_id_is_set(simulator, tmp_path):
    text = make_client(simulator, tmp_path, app_id="app-demo").complete(MESSAGES)
    assert '"is_interested"' in text
    # one call, to the app's endpoint, none to Generation
    assert simulator.state.stats()["dashscope"] == {"Application": 1}


@pytest.mark.parametrize("status,code", [(429, "Throttling.RateQuota"), (500, "InternalError")])
def test_throttling_and_5xx_are_retried(simulator, tmp_path, status, code):
    simulator.state.inject_fault(action="dashscope", status=status, code=code, message="x", times=2)
    assert '"is_interested"' in make_client(simulator, tmp_path).complete(MESSAGES)
    assert simulator.state.stats()["dashscope_requests"] == 3


def test_throttling_longer_than_the_budget_is_a_clear_error(simulator, tmp_path):
    simulator.state.inject_fault(action="dashscope", status=429, code="Throttling.RateQuota", message="x", times=9)
    with pytest.raises(LlmError) as info:
        make_client(simulator, tmp_path).complete(MESSAGES)
    assert info.value.status_code == 429 and info.value.retryable
    assert "sk-test-secret" not in str(info.value)


def test_data_inspection_failed_is_not_retried(simulator, tmp_path):
    simulator.state.inject_fault(action="dashscope", status=400, code="DataInspectionFailed",
                                 message="Input data may contain inappropriate content.", times=1)
    with pytest.raises(LlmError) as info:
        make_client(simulator, tmp_path).complete(MESSAGES)
    assert info.value.code == "DataInspectionFailed" and not info.value.retryable
    assert simulator.state.stats()["dashscope_requests"] == 1


def test_timeout_is_retried_then_a_clear_error(simulator, tmp_path):
    simulator.state.inject_fault(action="dashscope", latency_ms=800, times=3)
    with pytest.raises(LlmError) as info:
        make_client(simulator, tmp_path, request_timeout_s=0.2).complete(MESSAGES)
    assert info.value.code == "Timeout"


def test_concurrency_limit_holds_across_threads(simulator, tmp_path):
    simulator.state.set_latency(dashscope_ms=100)
    client = make_client(simulator, tmp_path, max_concurrency=3)
    threads = [threading.Thread(target=client.complete, args=(MESSAGES,)) for _ in range(9)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert simulator.state.stats()["max_llm_in_flight"] <= 3
    assert time.monotonic() - started >= 0.3  # 9 calls, 3 at a time, 0.1 s each


def _without_proxy_variables(monkeypatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
                 "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


def test_the_proxy_variables_are_honoured_as_requests_would(simulator, tmp_path, monkeypatch):
    """The client reads them once, for its URL: a proxy that does not exist is used (the call
    fails as a network error, retried), unless NO_PROXY excludes the host."""
    _without_proxy_variables(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    with pytest.raises(LlmError) as info:
        make_client(simulator, tmp_path, max_attempts=2).complete(MESSAGES)
    assert info.value.code == "NetworkError" and info.value.retryable
    assert simulator.state.stats()["dashscope_requests"] == 0

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    assert '"is_interested"' in make_client(simulator, tmp_path).complete(MESSAGES)


def test_calls_reuse_the_clients_connections(simulator, tmp_path, monkeypatch):
    _without_proxy_variables(monkeypatch)
    client = make_client(simulator, tmp_path)
    for _ in range(5):
        client.complete(MESSAGES)
    session = client._http_session(simulator.dashscope_base_url)
    assert session.trust_env is False  # the environment is not read again per call
    pools = session.get_adapter(simulator.dashscope_base_url).poolmanager.pools
    assert len(pools) == 1  # one host, one pool, its connections kept alive


# Contract §12, "An outage is not a verdict": what the account or the service answers is an outage,
# what the lead's own request causes is not. Each through the real SDK against the simulator.
@pytest.mark.parametrize("status,code,message", [
    (400, "Arrearage", None),
    (401, "InvalidApiKey", None),
    (403, "AccessDenied", None),
    (404, "ModelNotFound", None),
    (400, "InvalidParameter", "Model not exist."),
    (500, "InternalError", None),
])
def test_account_and_service_failures_are_outages(simulator, tmp_path, status, code, message):
    fault = {"message": message} if message else {}
    simulator.state.inject_fault(action="dashscope", status=status, code=code, times=None, **fault)
    with pytest.raises(LlmError) as info:
        make_client(simulator, tmp_path).complete(MESSAGES)
    assert info.value.code == code and info.value.status_code == status
    assert info.value.is_outage and info.value.kind == "outage"


def test_throttling_past_the_retries_and_timeouts_are_outages(simulator, tmp_path):
    simulator.state.inject_fault(action="dashscope", status=429, code="Throttling.RateQuota", times=3)
    with pytest.raises(LlmError) as throttled:
        make_client(simulator, tmp_path).complete(MESSAGES)
    simulator.state.inject_fault(action="dashscope", latency_ms=800, times=3)
    with pytest.raises(LlmError) as timed_out:
        make_client(simulator, tmp_path, request_timeout_s=0.2).complete(MESSAGES)
    assert throttled.value.is_outage and timed_out.value.is_outage


@pytest.mark.parametrize("app_id", [None, "app-demo"])
def test_an_http_200_with_an_error_code_and_no_output_is_an_outage(simulator, tmp_path, app_id):
    """The SDK itself fails on such an answer (TypeError building its output); the client turns it
    into an LlmError that names the answer's code."""
    simulator.state.inject_fault(action="dashscope", error_200=True, code="Arrearage", times=None)
    with pytest.raises(LlmError) as info:
        make_client(simulator, tmp_path, **({"app_id": app_id} if app_id else {})).complete(MESSAGES)
    assert info.value.code == "Arrearage" and info.value.status_code == 200
    assert info.value.is_outage
    assert "good standing" in str(info.value) and "no output" in str(info.value)


@pytest.mark.parametrize("status,code,message", [
    (400, "DataInspectionFailed", None),
    (400, "InvalidParameter", "<400> InternalError.Algo.InvalidParameter: Range of input length should be "
                              "[1, 129024]"),
])
def test_a_failure_of_the_leads_own_request_is_not_an_outage(simulator, tmp_path, status, code, message):
    fault = {"message": message} if message else {}
    simulator.state.inject_fault(action="dashscope", status=status, code=code, times=1, **fault)
    with pytest.raises(LlmError) as info:
        make_client(simulator, tmp_path).complete(MESSAGES)
    assert info.value.code == code and info.value.kind == "lead" and not info.value.is_outage
    assert simulator.state.stats()["dashscope_requests"] == 1


@pytest.mark.parametrize("status,code,message,kind", [
    (None, "Timeout", "", OUTAGE), (None, "NetworkError", "", OUTAGE), (200, "Arrearage", "", OUTAGE),
    (400, "Arrearage", "", OUTAGE), (400, "Throttling.AllocationQuota", "", OUTAGE), (429, "Unknown", "", OUTAGE),
    (502, "Unknown", "<html>", OUTAGE), (403, "AccessDenied.Unpurchased", "", OUTAGE),
    (400, "InvalidParameter", "The model `qwen-plux` does not exist", OUTAGE),
    (400, "InvalidParameter", "'messages' must contain the word 'json'", LEAD),
    (400, "DataInspectionFailed", "", LEAD), (200, "EmptyAnswer", "", LEAD),
])
def test_classify_failure(status, code, message, kind):
    assert classify_failure(status, code, message) == kind
