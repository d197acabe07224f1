"""The DashScope / Bailian side of the simulator, through the unmodified dashscope SDK."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import dashscope
import pytest
import requests

NOW = "2025-06-02 10:00:00"


def _messages(customer: str, *, json_word: bool = True) -> list[dict]:
    system = f"你是外呼通话分析助手。当前时间：{NOW}。" + ("只输出 JSON 对象。" if json_word else "只输出对象。")
    user = f"<transcript>\n机器人: 您好，请问是王先生吗？\n客户: {customer}\n</transcript>"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _generate(sim, messages, **kw):
    kw.setdefault("result_format", "message")
    return dashscope.Generation.call(model="qwen-plus", messages=messages, api_key="sk-test",
                                     base_address=sim.dashscope_base_url, **kw)


def test_generation_message_format_in_json_mode(sim):
    resp = _generate(sim, _messages("这车落地价格多少？明天下午打给我。"), response_format={"type": "json_object"})
    assert resp.status_code == 200 and resp.request_id
    choice = resp.output.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    answer = json.loads(choice.message.content)
    assert answer["is_interested"] == 1
    assert answer["next_follow_time"] == "2025-06-03 14:00:00"
    assert answer["leads_remark"]
    assert resp.usage.input_tokens > 0 and resp.usage.total_tokens > resp.usage.input_tokens
    assert sim.state.llm_requests[-1]["parameters"]["response_format"] == {"type": "json_object"}
    assert sim.state.llm_requests[-1]["input"]["messages"][1]["content"].startswith("<transcript>")


def test_generation_text_format(sim):
    resp = _generate(sim, _messages("不需要，已经买了。"), result_format="text")
    assert resp.status_code == 200
    assert json.loads(resp.output.text)["is_interested"] == 2
    assert resp.output.finish_reason == "stop"


def test_json_mode_without_the_word_json_is_invalid_parameter(sim):
    resp = _generate(sim, _messages("价格多少？", json_word=False), response_format={"type": "json_object"})
    assert resp.status_code == 400 and resp.code == "InvalidParameter"
    assert "json" in resp.message and resp.output is None


@pytest.mark.parametrize(("fault", "status", "code"), [
    ({"status": 429}, 429, "Throttling.RateQuota"),
    ({"status": 500}, 500, "InternalError"),
    ({"status": 400, "code": "DataInspectionFailed"}, 400, "DataInspectionFailed"),
    ({"status": 400, "code": "Arrearage"}, 400, "Arrearage"),
    ({"status": 401}, 401, "InvalidApiKey"),
    ({"status": 403}, 403, "AccessDenied"),
    ({"status": 404}, 404, "ModelNotFound"),
    ({"status": 400, "code": "InvalidParameter", "message": "Model not exist."}, 400, "InvalidParameter"),
])
def test_dashscope_error_faults_come_back_as_status_codes(sim, fault, status, code):
    sim.state.inject_fault(action="dashscope", **fault)
    resp = _generate(sim, _messages("价格多少？"))
    assert resp.status_code == status and resp.code == code and resp.message
    assert resp.output is None
    assert _generate(sim, _messages("价格多少？")).status_code == 200  # times=1 by default


def test_latency_fault_raises_read_timeout(sim):
    sim.state.inject_fault(action="Generation", latency_ms=1500)
    with pytest.raises(requests.exceptions.ReadTimeout):
        _generate(sim, _messages("价格多少？"), request_timeout=0.3)


def test_llm_content_fault_returns_that_content(sim):
    requests.post(f"{sim.url}/__sim/faults", json={"action": "Generation", "llm_content": "not json at all"})
    resp = _generate(sim, _messages("价格多少？"))
    assert resp.status_code == 200 and resp.output.choices[0].message.content == "not json at all"


def test_fault_matching_text_only_hits_that_transcript(sim):
    sim.state.inject_fault(action="dashscope", status=500, match_text="王五", times=None)
    assert _generate(sim, _messages("我是王五，价格多少？")).status_code == 500
    assert _generate(sim, _messages("价格多少？")).status_code == 200


def test_missing_api_key_is_401(sim):
    url = f"{sim.dashscope_base_url}/services/aigc/text-generation/generation"
    body = {"model": "qwen-plus", "input": {"messages": _messages("价格？")}, "parameters": {}}
    resp = requests.post(url, json=body, timeout=5)
    assert resp.status_code == 401 and resp.headers["Content-Type"].startswith("application/json")
    assert resp.json()["code"] == "InvalidApiKey"
    resp = requests.post(url, json=body, headers={"Authorization": "Bearer "}, timeout=5)
    assert resp.status_code == 401


def test_application_call(sim):
    resp = dashscope.Application.call(app_id="app-1", prompt=_messages("我想预约试驾")[1]["content"],
                                      api_key="sk-test", base_address=sim.dashscope_base_url)
    assert resp.status_code == 200
    assert json.loads(resp.output.text)["is_interested"] == 1
    assert resp.output.finish_reason == "stop" and resp.output.session_id
    assert resp.usage.models[0].input_tokens > 0
    assert sim.state.stats()["dashscope"] == {"Application": 1}


def test_application_fault_and_messages_input(sim):
    sim.state.inject_fault(action="Application", status=429)
    resp = dashscope.Application.call(app_id="app-1", messages=_messages("没兴趣"), api_key="sk-test",
                                      base_address=sim.dashscope_base_url)
    assert resp.status_code == 429 and resp.code == "Throttling.RateQuota"
    resp = dashscope.Application.call(app_id="app-1", messages=_messages("没兴趣"), api_key="sk-test",
                                      base_address=sim.dashscope_base_url)
    assert json.loads(resp.output.text)["is_interested"] == 2


def test_streaming_generation(sim):
    chunks = list(_generate(sim, _messages("价格多少？"), stream=True, incremental_output=True))
    assert len(chunks) >= 2 and all(c.status_code == 200 for c in chunks)
    text = "".join(c.output.choices[0].message.content for c in chunks)
    assert json.loads(text)["is_interested"] == 1
    assert chunks[-1].output.choices[0].finish_reason == "stop"


def test_latency_and_in_flight_count(sim):
    sim.state.set_latency(dashscope_ms=200)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: _generate(sim, _messages("价格？")).status_code, range(6)))
    assert results == [200] * 6
    stats = sim.state.stats()
    assert stats["dashscope_requests"] == 6 and stats["max_llm_in_flight"] >= 3
    assert len(sim.state.llm_requests) == 6


def test_compatible_mode_chat_completions(sim):
    resp = requests.post(f"{sim.url}/compatible-mode/v1/chat/completions", timeout=5,
                         headers={"Authorization": "Bearer sk-test"},
                         json={"model": "qwen-plus", "messages": _messages("价格多少？")})
    assert resp.status_code == 200
    assert json.loads(resp.json()["choices"][0]["message"]["content"])["is_interested"] == 1


def test_an_http_200_error_fault_has_a_code_and_no_output(sim):
    """What DashScope has been seen to answer: HTTP 200 whose body is an error; the SDK cannot
    build its response from it (the client's tests show what the pipeline makes of that)."""
    response = requests.post(
        f"{sim.dashscope_base_url}/services/aigc/text-generation/generation",
        headers={"Authorization": "Bearer sk-test"},
        json={"model": "qwen-plus", "input": {"messages": _messages("价格多少？")}}, timeout=5)
    assert response.status_code == 200 and "output" in response.json()
    sim.state.inject_fault(action="dashscope", error_200=True, code="Arrearage")
    response = requests.post(
        f"{sim.dashscope_base_url}/services/aigc/text-generation/generation",
        headers={"Authorization": "Bearer sk-test"},
        json={"model": "qwen-plus", "input": {"messages": _messages("价格多少？")}}, timeout=5)
    body = response.json()
    assert response.status_code == 200 and "output" not in body
    assert body["code"] == "Arrearage" and body["message"] and body["request_id"]
    with pytest.raises(TypeError):  # the SDK's own failure on such an answer
        sim.state.inject_fault(action="dashscope", error_200=True, code="Arrearage")
        _generate(sim, _messages("价格多少？"))
