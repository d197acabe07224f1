"""What both simulated APIs put on the wire: the response type, JSON encoding, default error codes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

JSON_CT = "application/json;charset=utf-8"

# Alibaba Cloud's usual code and message for an HTTP status (a fault that gives only a status gets
# these); DashScope's own table (``dashscope``) comes first for its calls.
DEFAULT_CODES = {
    400: ("InvalidParameter", "The specified parameter is invalid."),
    401: ("InvalidApiKey", "Invalid API-key provided."),
    403: ("Forbidden.RAM", "User not authorized to operate on the specified resource."),
    404: ("InvalidAction.NotFound", "Specified api is not found, please check your url and method."),
    429: ("Throttling", "Request was denied due to flow control."),
    500: ("InternalError", "The request processing has failed due to some unknown error."),
    502: ("BadGateway", "Bad gateway."),
    503: ("ServiceUnavailable", "The request has failed due to a temporary failure of the server."),
}
# The real message of a code a fault may name without a message.
KNOWN_MESSAGES = {
    "Throttling.User": "Request was denied due to user flow control.",
    "DataInspectionFailed": "Input data may contain inappropriate content.",
    "Throttling.AllocationQuota": "Allocated quota exceeded, please increase your quota limit.",
    # DashScope's account and model errors (help.aliyun.com/zh/model-studio/error-code).
    "Arrearage": "Access denied, please make sure your account is in good standing.",
    "AccessDenied": "Access denied.",
    "InvalidApiKey": "Invalid API-key provided.",
    "ModelNotFound": "Model not exist.",
    # OutboundBot: DownloadRecording for a call whose recording is gone.
    "Recording.NotExist": "The recording does not exist.",
}


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, non-ASCII kept as is (as both services send it)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@dataclass
class SimResponse:
    status: int
    body: bytes = b""
    content_type: str = JSON_CT
    headers: dict[str, str] = field(default_factory=dict)
