"""The simulated DashScope / Bailian API, answering from a ``SimulatorState`` with ``llm_standin``.

Three endpoints, named as faults and stats name them: "Generation" (text generation), "Application"
(a Bailian app's completion) and "ChatCompletions" (the OpenAI-compatible mode, with its own error
shape). ``endpoint_of`` maps a request path to one of them; ``handle`` serves the call: a JSON answer,
or a server-sent event stream when the client asks for SSE.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from email.message import Message
from typing import Any

from call_pipeline_tools.simulator import llm_standin
from call_pipeline_tools.simulator.state import SimulatorState
from call_pipeline_tools.simulator.wire import DEFAULT_CODES, KNOWN_MESSAGES, SimResponse, dumps

GENERATION_PATH = "/services/aigc/text-generation/generation"
COMPATIBLE_PATH = "/compatible-mode/v1/chat/completions"
_APP_RE = re.compile(r"/apps/[^/]+/completion$")

_DS_DEFAULT_CODES = {
    400: ("InvalidParameter", "Input data is invalid."),
    401: ("InvalidApiKey", "Invalid API-key provided."),
    403: ("AccessDenied", "Access denied."),
    404: ("ModelNotFound", "Model not exist."),
    429: ("Throttling.RateQuota", "Requests rate limit exceeded, please try again later."),
    500: ("InternalError",
          "An internal error has occured, please try again later or contact service support."),
    503: ("ServiceUnavailable", "The service is temporarily unavailable."),
}


def endpoint_of(path: str) -> str | None:
    """The DashScope endpoint a request path names, or None (every app id is served alike)."""
    if path.endswith(GENERATION_PATH):
        return "Generation"
    if _APP_RE.search(path):
        return "Application"
    if path.endswith(COMPATIBLE_PATH):
        return "ChatCompletions"
    return None


def _error(status: int, code: str, message: str, compat: bool) -> SimResponse:
    if compat:
        body = dumps({"error": {"message": message, "type": code, "param": None, "code": code},
                      "request_id": str(uuid.uuid4())})
    else:
        body = dumps({"request_id": str(uuid.uuid4()), "code": code, "message": message})
    return SimResponse(status, body, "application/json")


def handle(state: SimulatorState, endpoint: str, headers: Message, raw: bytes) -> SimResponse:
    """One DashScope call (endpoint: "Generation", "Application" or "ChatCompletions")."""
    state.dashscope_call_started(endpoint)
    try:
        return _serve(state, endpoint, headers, raw)
    finally:
        state.dashscope_call_finished()


def _serve(state: SimulatorState, endpoint: str, headers: Message, raw: bytes) -> SimResponse:
    compat = endpoint == "ChatCompletions"
    text = raw.decode("utf-8", errors="replace")
    try:
        body = json.loads(text) if text.strip() else {}
    except ValueError:
        body = None
    if isinstance(body, dict):
        state.record_llm_request(body)
    auth = headers.get("Authorization") or ""
    if not auth.startswith("Bearer ") or not auth[len("Bearer "):].strip():
        return _error(401, "InvalidApiKey", "Invalid API-key provided.", compat)
    with state.lock:
        fault = state.take_fault("dashscope", endpoint, text=text)
        delay = state.dashscope_latency_ms + (fault.latency_ms if fault else 0)
    if delay > 0:
        time.sleep(delay / 1000)
    if fault is not None and fault.error_200:
        # An error code in an HTTP 200 with no output, as DashScope has been seen to answer.
        code = fault.code or "InternalError"
        return SimResponse(200, dumps({"request_id": str(uuid.uuid4()), "code": code,
                                       "message": fault.message or KNOWN_MESSAGES.get(code, "")}),
                           "application/json", dict(fault.headers))
    if fault is not None and not fault.latency_only and fault.llm_content is None:
        if fault.raw_body is not None:
            return SimResponse(fault.status or 502, fault.raw_body.encode("utf-8"),
                               "text/html;charset=utf-8", dict(fault.headers))
        status = fault.status or 500
        code, message = _DS_DEFAULT_CODES.get(status) or DEFAULT_CODES.get(status) or ("InternalError",
                                                                                        "Error")
        code = fault.code or code
        resp = _error(status, code, fault.message or KNOWN_MESSAGES.get(code, message), compat)
        resp.headers.update(fault.headers)
        return resp
    if not isinstance(body, dict):
        return _error(400, "InvalidParameter", "Request body is not valid JSON.", compat)

    inp = body.get("input") if isinstance(body.get("input"), dict) else {}
    params = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    if compat:
        messages = body.get("messages")
        params = body
    else:
        messages = inp.get("messages")
    if not messages:
        prompt = inp.get("prompt")
        messages = [{"role": "user", "content": prompt}] if prompt else None
    if endpoint == "Application" and inp.get("biz_params"):
        messages = [*(messages or []),
                    {"role": "user", "content": json.dumps(inp["biz_params"], ensure_ascii=False)}]
    if not messages or not isinstance(messages, list):
        return _error(400, "InvalidParameter", "Input messages or prompt must not be empty.", compat)
    messages = [m if isinstance(m, dict) else {"role": "user", "content": str(m)} for m in messages]
    response_format = params.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_object":
        all_text = " ".join(llm_standin.content_text(m.get("content")) for m in messages)
        if "json" not in all_text.lower():
            return _error(400, "InvalidParameter",
                          "<400> InternalError.Algo.InvalidParameter: 'messages' must contain "
                          "the word 'json' in some form, to use 'response_format' of type "
                          "'json_object'.", compat)
    content = fault.llm_content if fault is not None and fault.llm_content is not None else \
        llm_standin.respond(messages)
    in_tokens = max(1, sum(len(llm_standin.content_text(m.get("content"))) for m in messages) // 2)
    out_tokens = max(1, len(content) // 2)
    request_id = str(uuid.uuid4())
    stream = ((headers.get("X-DashScope-SSE") or "").lower() == "enable"
              or "text/event-stream" in (headers.get("Accept") or ""))
    if compat:
        return SimResponse(200, dumps({
            "id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", ""), "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": in_tokens, "completion_tokens": out_tokens,
                      "total_tokens": in_tokens + out_tokens}}))

    def output(piece: str, finish: str) -> dict:
        if endpoint == "Application":
            return {"text": piece, "finish_reason": finish, "session_id": uuid.uuid4().hex,
                    "thoughts": None, "doc_references": None}
        if params.get("result_format") == "message":
            return {"choices": [{"finish_reason": finish,
                                 "message": {"role": "assistant", "content": piece}}]}
        return {"text": piece, "finish_reason": finish}

    if endpoint == "Application":
        usage: dict[str, Any] = {"models": [{"model_id": "qwen-plus", "input_tokens": in_tokens,
                                             "output_tokens": out_tokens}]}
    else:
        usage = {"input_tokens": in_tokens, "output_tokens": out_tokens,
                 "total_tokens": in_tokens + out_tokens}
    if not stream:
        return SimResponse(200, dumps({"request_id": request_id, "output": output(content, "stop"),
                                       "usage": usage}))
    # Streaming: the whole event stream is built up front (Content-Length known, keep-alive safe).
    incremental = bool(params.get("incremental_output"))
    n = 3
    cuts = [len(content) * i // n for i in range(n + 1)]
    events = []
    for i in range(n):
        piece = content[cuts[i]:cuts[i + 1]] if incremental else content[:cuts[i + 1]]
        chunk = {"request_id": request_id, "output": output(piece, "stop" if i == n - 1 else "null"),
                 "usage": usage}
        events.append(f"id:{i + 1}\nevent:result\n:HTTP_STATUS/200\ndata:"
                      f"{json.dumps(chunk, ensure_ascii=False)}\n\n")
    return SimResponse(200, "".join(events).encode("utf-8"), "text/event-stream;charset=UTF-8")
