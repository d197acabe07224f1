"""The one wrapper around DashScope / Bailian, on the real `dashscope` SDK.

The SDK returns HTTP errors as response objects instead of raising, and retries nothing (only a
resend on a dropped keep-alive connection), so the wrapper checks `status_code` itself and retries
throttling (429), 5xx and timeouts with exponential backoff. `DataInspectionFailed` and other 4xx
answers are final. Every attempt holds one slot of the shared concurrency limit, so retries count.

Every failure is classified here, and only here (`classify_failure`): an *outage* is a failure of
the account or the service (the key, arrears, access, the model's name, throttling, 5xx, timeouts,
the network, an HTTP 200 carrying an error code and no output), which says nothing about the
lead; a *lead* failure is the lead's own (`DataInspectionFailed`, another 400 about the request's
content, an empty answer). Step 5 writes no verdict for an outage (contract §12).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import requests

from call_pipeline.clients.limits import SharedSemaphore

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {429, 500, 502, 503, 504}

OUTAGE, LEAD = "outage", "lead"
# Codes that name the account or the service, whatever the HTTP status that carries them.
OUTAGE_CODES = frozenset({"InvalidApiKey", "Arrearage", "AccessDenied", "ModelNotFound", "NotFound",
                          "InternalError", "ServiceUnavailable", "Timeout", "NetworkError",
                          "ErrorWithoutOutput"})
OUTAGE_CODE_PREFIXES = ("Throttling", "AccessDenied", "InternalError", "ModelNotFound", "Arrearage")
# Statuses that never depend on the request's content: auth, access, a missing model or path,
# throttling, the service's own errors.
OUTAGE_STATUSES = frozenset({401, 403, 404, 408, 429})
# A 400 InvalidParameter about the model (not about the transcript): the model's name is wrong.
_UNKNOWN_MODEL = re.compile(r"model\b.{0,40}\b(not exist|does not exist|not found|not supported|"
                            r"is invalid|unknown)|\b(unknown|invalid|unsupported) model", re.IGNORECASE)


def classify_failure(status_code: int | None, code: str | None, message: str = "") -> str:
    """OUTAGE or LEAD, from what DashScope answered (no status: the call never got an answer)."""
    if status_code is None or status_code == HTTPStatus.OK:
        # No answer at all (timeout, network), or a 200 that carried an error and no output.
        return OUTAGE if code != "EmptyAnswer" else LEAD
    if status_code >= 500 or status_code in OUTAGE_STATUSES:
        return OUTAGE
    if code and (code in OUTAGE_CODES or code.startswith(OUTAGE_CODE_PREFIXES)):
        return OUTAGE
    if code == "InvalidParameter" and _UNKNOWN_MODEL.search(message or ""):
        return OUTAGE
    return LEAD


class LlmError(RuntimeError):
    """The LLM call failed after its retries, or with a final error. Never carries the API key.
    `kind` (`classify_failure`): OUTAGE, the account's or the service's failure, or LEAD."""

    def __init__(self, code: str | None, message: str, status_code: int | None = None,
                 request_id: str | None = None, retryable: bool = False) -> None:
        self.code = code
        self.status_code = status_code
        self.request_id = request_id
        self.retryable = retryable
        self.kind = classify_failure(status_code, code, message)
        super().__init__(f"DashScope call failed: {status_code or '-'} {code or 'error'}: {message}"
                         + (f" (request id {request_id})" if request_id else ""))

    @property
    def is_outage(self) -> bool:
        return self.kind == OUTAGE


@dataclass(frozen=True)
class DashScopeConfig:
    """What the client needs to know: DashScopeResource (resources.py), which holds the settings and
    their defaults, builds it."""

    api_key: str
    model: str
    app_id: str | None
    base_http_api_url: str | None
    max_concurrency: int
    request_timeout_s: float
    # attempts of one call, and the backoff between them (DashScope returns errors, the client retries)
    max_attempts: int
    backoff_s: float
    max_backoff_s: float


class LlmClient:
    def __init__(self, settings: DashScopeConfig, semaphore: SharedSemaphore | None = None) -> None:
        self.settings = settings
        self._semaphore = semaphore
        self._session: requests.Session | None = None

    def _http_session(self, base_url: str) -> requests.Session:
        """The client's own session for the SDK (its `session=`): requests would read the proxy
        variables from the whole environment again on every call (about 0.2 ms of a call's 1.7 ms
        of CPU, measured against the simulator), so they are read once here, for the DashScope
        URL, with the same rules (HTTP(S)_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE)."""
        if self._session is None:
            session = requests.Session()
            session.proxies = requests.utils.get_environ_proxies(base_url)
            bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            if bundle:
                session.verify = bundle
            session.trust_env = False
            pool = max(10, self.settings.max_concurrency + 2)
            adapter = requests.adapters.HTTPAdapter(pool_connections=2, pool_maxsize=pool)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.hooks["response"].append(_remember_answer)
            self._session = session
        return self._session

    @property
    def uses_app(self) -> bool:
        return bool(self.settings.app_id)

    def complete(self, messages: list[dict[str, str]]) -> str:
        """The model's text answer for `messages`, after retries; raises LlmError."""
        last_error: LlmError | None = None
        for attempt in range(1, self.settings.max_attempts + 1):
            if attempt > 1:
                delay = min(self.settings.max_backoff_s, self.settings.backoff_s * 2 ** (attempt - 2))
                time.sleep(delay * (0.5 + random.random() / 2))
            try:
                return self._attempt(messages)
            except LlmError as exc:
                last_error = exc
                if not exc.retryable:
                    raise
                log.warning("DashScope attempt %d/%d failed: %s", attempt, self.settings.max_attempts, exc)
        assert last_error is not None
        raise last_error

    def _attempt(self, messages: list[dict[str, str]]) -> str:
        hold = self._semaphore.hold() if self._semaphore else contextlib.nullcontext()
        with hold:
            try:
                response = self._send(messages)
            except requests.Timeout as exc:
                raise LlmError("Timeout", str(exc), retryable=True) from None
            except requests.RequestException as exc:
                raise LlmError("NetworkError", str(exc), retryable=True) from None
            except (TypeError, AttributeError, KeyError, ValueError) as exc:
                # The SDK builds its response object from `output` without checking for it, so
                # an HTTP 200 carrying an error code and no output fails inside the SDK.
                raise _error_without_output(exc) from None
        return self._text_of(response)

    def _send(self, messages: list[dict[str, str]]):
        # Imported here: the SDK takes 0.6 s to import, and most processes that load the
        # definitions (the daemon, the run process, the code server) never call it. Step processes
        # fork from a server that has it preloaded (executors.PRELOADED_MODULES).
        import dashscope

        base_url = self.settings.base_http_api_url or dashscope.base_http_api_url
        common: dict[str, Any] = {
            "api_key": self.settings.api_key,
            "request_timeout": self.settings.request_timeout_s,
            "session": self._http_session(base_url),
        }
        if self.settings.base_http_api_url:
            common["base_address"] = self.settings.base_http_api_url
        if self.uses_app:
            return dashscope.Application.call(app_id=self.settings.app_id, messages=messages, **common)
        return dashscope.Generation.call(
            model=self.settings.model,
            messages=messages,
            result_format="message",
            response_format={"type": "json_object"},
            temperature=0.1,
            **common,
        )

    def _text_of(self, response) -> str:
        status = getattr(response, "status_code", None)
        if status != HTTPStatus.OK:
            code = getattr(response, "code", None)
            message = str(getattr(response, "message", "") or "")[:300]
            retryable = status in RETRYABLE_STATUS or (code or "").startswith("Throttling")
            raise LlmError(code, message, status, getattr(response, "request_id", None), retryable=retryable)
        if not response.output and getattr(response, "code", None):
            raise LlmError(response.code, f"{response.message or ''}: HTTP 200 with no output", status,
                           getattr(response, "request_id", None),
                           retryable=str(response.code).startswith("Throttling"))
        output = response.output or {}
        if self.uses_app:
            text = output.get("text")
        else:
            choices = output.get("choices") or []
            text = (choices[0].get("message") or {}).get("content") if choices else output.get("text")
        if not isinstance(text, str) or not text.strip():
            raise LlmError("EmptyAnswer", "the model returned no text", status,
                           getattr(response, "request_id", None))
        return text



_answers = threading.local()


def _remember_answer(response: requests.Response, *args: Any, **kwargs: Any) -> None:
    """The session's response hook: this thread's last answer, to tell what an answer that the
    SDK could not read carried (its code and message)."""
    _answers.last = (response.status_code, response.headers.get("Content-Type", ""), response.content[:2000])


def _error_without_output(exc: Exception) -> LlmError:
    status, content_type, raw = getattr(_answers, "last", (None, "", b""))
    _answers.last = (None, "", b"")
    code = message = request_id = None
    try:
        import json

        body = json.loads(raw.decode("utf-8", errors="replace")) if raw else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        code, message, request_id = body.get("code"), body.get("message"), body.get("request_id")
    code = str(code) if code else "ErrorWithoutOutput"
    detail = f"HTTP {status} with no output ({type(exc).__name__} in the SDK)"
    return LlmError(code, f"{message}: {detail}" if message else detail, status, request_id,
                    retryable=code.startswith("Throttling"))
