"""The one wrapper around DashScope / Bailian, on the real `dashscope` SDK.

The SDK returns HTTP errors as response objects instead of raising, and retries nothing (only a
resend on a dropped keep-alive connection), so the wrapper checks `status_code` itself and retries
throttling (429), 5xx and timeouts with exponential backoff. `DataInspectionFailed` and other 4xx
answers are final. Every attempt holds one slot of the shared concurrency limit, so retries count.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import requests

from call_pipeline.clients.limits import SharedSemaphore

if TYPE_CHECKING:  # the resource is the client's configuration
    from call_pipeline.resources import DashScopeResource

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {429, 500, 502, 503, 504}


class LlmError(RuntimeError):
    """The LLM call failed after its retries, or with a final error. Never carries the API key."""

    def __init__(self, code: str | None, message: str, status_code: int | None = None,
                 request_id: str | None = None, retryable: bool = False) -> None:
        self.code = code
        self.status_code = status_code
        self.request_id = request_id
        self.retryable = retryable
        super().__init__(f"DashScope call failed: {status_code or '-'} {code or 'error'}: {message}"
                         + (f" (request id {request_id})" if request_id else ""))


class LlmClient:
    def __init__(self, settings: DashScopeResource, semaphore: SharedSemaphore | None = None) -> None:
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

