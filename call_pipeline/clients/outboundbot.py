"""The one wrapper around Alibaba Cloud OutboundBot (API 2019-12-26), on the real SDK.

What it absorbs from the SDK (each checked against the SDK by call_pipeline_tests/clients/test_outboundbot_client.py):
- Retries: the SDK's own `Config(retry_options=...)` retries throttling, 5xx and network errors
  with backoff (its `RuntimeOptions.autoretry` is ignored, and it retries nothing by default).
- Every request that goes out, retries included, passes the shared rate limiter: the SDK retries
  inside its own loop, so a limiter around the call would miss them. The SDK has no per-request
  hook, so the limiter sits in a requests transport adapter mounted on the SDK's session, and
  within it in the connection: the grant is taken once the connection is open (TCP, TLS, a
  proxy's tunnel), right before the request's bytes are written, because the cloud counts a
  request when it arrives.
- Proxies: the SDK reads HTTP(S)_PROXY itself and ignores NO_PROXY; the same adapter drops the
  proxy for hosts that NO_PROXY (or loopback) excludes.
- HTTP 200 with `Success: false` is an error (the SDK does not raise on it).
- An answer the SDK's models cannot parse comes back with `body=None`; the raw answer is used.
- `ListJobs` takes at most 99 job ids; the wrapper refuses more, and `split_for_list_jobs` splits.

The SDK (0.4 s to import) is imported when the first client is built, not with this module:
the processes that load the definitions without calling OutboundBot (the run process, the
daemon, the webserver) start that much sooner; the step processes' forkserver preloads it
(executors.PRELOADED_MODULES).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import requests
from requests.adapters import HTTPAdapter
from requests.utils import should_bypass_proxies
from Tea.exceptions import TeaException, UnretryableException
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from call_pipeline.clients.limits import SharedRateLimiter

if TYPE_CHECKING:
    from darabonba.policy.retry import RetryOptions

log = logging.getLogger(__name__)

LIST_JOBS_MAX_IDS = 99
# DownloadRecording's answers for a call attempt that has no recording to give: final, not retried.
INVALID_TASK_ID_CODES = frozenset({"InvalidParameter", "InvalidTaskId", "TaskNotFound", "NoSignatureUrl"})
RETRYABLE_CODES = [
    "Throttling",
    "Throttling.User",
    "Throttling.Api",
    "ServiceUnavailable",
    "InternalError",
]


class OutboundBotError(RuntimeError):
    """A failed OutboundBot call, after the SDK's retries. Never carries credentials."""

    def __init__(self, action: str, code: str | None, message: str, request_id: str | None = None,
                 retryable: bool = False) -> None:
        self.action = action
        self.code = code
        self.request_id = request_id
        self.retryable = retryable
        self.invalid_task_id = action == "DownloadRecording" and code in INVALID_TASK_ID_CODES
        super().__init__(f"OutboundBot {action} failed: {code or 'error'}: {message}"
                         + (f" (request id {request_id})" if request_id else ""))


def split_for_list_jobs(job_ids: Sequence[str]) -> list[list[str]]:
    """`job_ids` in calls of as many ids as ListJobs takes."""
    ids = list(job_ids)
    return [ids[start:start + LIST_JOBS_MAX_IDS] for start in range(0, len(ids), LIST_JOBS_MAX_IDS)]


def build_retry_options(max_attempts: int, backoff_ms: int, max_backoff_ms: int) -> RetryOptions:
    from darabonba.policy.retry import RetryCondition, RetryOptions

    return RetryOptions({
        "retryable": True,
        "retryCondition": [RetryCondition({
            "maxAttempts": max_attempts,
            # RetryError is how the SDK reports timeouts and refused connections.
            "exception": ["ThrottlingException", "ServerException", "RetryError"],
            "errorCode": RETRYABLE_CODES,
            "backoff": {"policy": "ExponentialWithEqualJitter", "period": backoff_ms, "cap": max_backoff_ms},
            "maxDelay": max_backoff_ms * 4,
        })],
    })


class _GatedConnection:
    """Mixed into urllib3's connections: waits for the rate limiter right before the request is
    written. Opening a new connection (a TCP handshake, TLS, a proxy's CONNECT) takes from under a
    millisecond to hundreds; done after the grant, it delayed some requests and not others, and
    requests granted apart arrived together."""

    limiter: SharedRateLimiter | None = None

    def request(self, method, url, body=None, headers=None, **kwargs):
        if self.limiter is not None:
            if self.is_closed:
                self.connect()
            self.limiter.acquire()
        return super().request(method, url, body=body, headers=headers, **kwargs)


def _gated_pool_classes(limiter: SharedRateLimiter | None) -> dict[str, type]:
    connections = {scheme: type(f"Gated{cls.__name__}", (_GatedConnection, cls), {"limiter": limiter})
                   for scheme, cls in (("http", HTTPConnection), ("https", HTTPSConnection))}
    return {"http": type("GatedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": connections["http"]}),
            "https": type("GatedHTTPSConnectionPool", (HTTPSConnectionPool,),
                          {"ConnectionCls": connections["https"]})}


class _GatedAdapter(HTTPAdapter):
    """Transport adapter for one OutboundBot host: its connections wait for the rate limiter
    before every request (each retry included); it drops proxies the host is excluded from."""

    def __init__(self, limiter: SharedRateLimiter | None, bypass_proxy: bool) -> None:
        self.limiter = limiter
        self.bypass_proxy = bypass_proxy
        self._pool_classes = _gated_pool_classes(limiter)
        super().__init__(pool_connections=4, pool_maxsize=64)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pool_classes

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = self._pool_classes
        return manager

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        if self.bypass_proxy:
            proxies = {}
        return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies)


_gates: dict[str, _GatedAdapter] = {}
_gates_lock = threading.Lock()
_original_get_session = None  # DaraCore's own, kept when the patch is installed


def _get_session_with_gates(*args, **kwargs):
    # Under the lock: the SDK caches one session per host but builds it (with an SSL context,
    # ~50 ms of CPU) unlocked, so threads that start together each built one.
    with _gates_lock:
        session = _original_get_session(*args, **kwargs)
    for prefix, adapter in list(_gates.items()):
        if session.adapters.get(prefix) is not adapter:
            session.mount(prefix, adapter)
    return session


def _install_gate(protocol: str, endpoint: str, adapter: _GatedAdapter) -> None:
    global _original_get_session
    from darabonba.core import DaraCore

    prefix = f"{protocol.lower()}://{endpoint.rstrip('/')}"
    with _gates_lock:
        _gates[prefix] = adapter
        # Patched once per process; the SDK's sessions are process-wide and cached by host.
        if DaraCore._get_session is not _get_session_with_gates:
            _original_get_session = DaraCore._get_session
            DaraCore._get_session = staticmethod(_get_session_with_gates)


def _bypasses_proxy(protocol: str, endpoint: str) -> bool:
    host = endpoint.split(":")[0]
    if host in ("127.0.0.1", "localhost", "::1"):
        return True
    return bool(should_bypass_proxies(f"{protocol}://{endpoint}/", no_proxy=None))


@dataclass(frozen=True)
class OutboundBotConfig:
    """What the client needs to know: OutboundBotResource (resources.py), which holds the settings and
    their defaults, builds it."""

    access_key_id: str
    access_key_secret: str
    instance_id: str
    endpoint: str
    protocol: str
    connect_timeout_ms: int
    read_timeout_ms: int
    # the SDK's own retries of one request: attempts, and its exponential backoff with jitter
    max_attempts: int
    backoff_ms: int
    max_backoff_ms: int


class OutboundBotClient:
    def __init__(self, settings: OutboundBotConfig, limiter: SharedRateLimiter | None = None) -> None:
        from alibabacloud_outboundbot20191226 import models
        from alibabacloud_outboundbot20191226.client import Client
        from alibabacloud_tea_openapi import models as open_api_models

        self.settings = settings
        self.instance_id = settings.instance_id
        self._models = models
        config = open_api_models.Config(
            access_key_id=settings.access_key_id,
            access_key_secret=settings.access_key_secret,
            endpoint=settings.endpoint,
            protocol=settings.protocol,
            region_id="cn-shanghai",
            connect_timeout=settings.connect_timeout_ms,
            read_timeout=settings.read_timeout_ms,
            retry_options=build_retry_options(settings.max_attempts, settings.backoff_ms,
                                              settings.max_backoff_ms),
        )
        self._client = Client(config)
        _install_gate(settings.protocol, settings.endpoint,
                      _GatedAdapter(limiter, _bypasses_proxy(settings.protocol, settings.endpoint)))

    def _call(self, action: str, method, request) -> dict[str, Any]:
        try:
            response = method(request)
        except TeaException as exc:
            raise _to_error(action, exc) from None
        except (requests.RequestException, OSError) as exc:
            raise OutboundBotError(action, "NetworkError", str(exc), retryable=True) from None
        body = _body_of(response)
        if body.get("Success") is False:
            raise OutboundBotError(
                action,
                body.get("Code"),
                body.get("Message") or f"HTTP 200 with Success=false (HttpStatusCode {body.get('HttpStatusCode')})",
                body.get("RequestId"),
                retryable=False,
            )
        return body

    def list_jobs_by_group(self, job_group_id: str, page_number: int, page_size: int) -> dict[str, Any]:
        request = self._models.ListJobsByGroupRequest(
            instance_id=self.instance_id, job_group_id=job_group_id,
            page_number=page_number, page_size=page_size,
        )
        return self._call("ListJobsByGroup", self._client.list_jobs_by_group, request)

    def list_jobs(self, job_ids: Sequence[str]) -> dict[str, Any]:
        if len(job_ids) > LIST_JOBS_MAX_IDS:
            raise ValueError(f"ListJobs takes at most {LIST_JOBS_MAX_IDS} job ids, got {len(job_ids)}")
        if not job_ids:
            return {"Jobs": []}
        request = self._models.ListJobsRequest(instance_id=self.instance_id, job_id=list(job_ids))
        return self._call("ListJobs", self._client.list_jobs, request)

    def download_recording(self, call_task_id: str) -> str:
        """The recording's SignatureUrl for a call attempt (the task id, not the job id)."""
        request = self._models.DownloadRecordingRequest(instance_id=self.instance_id, task_id=call_task_id)
        body = self._call("DownloadRecording", self._client.download_recording, request)
        url = (body.get("DownloadParams") or {}).get("SignatureUrl")
        if not url:
            raise OutboundBotError("DownloadRecording", "NoSignatureUrl",
                                   f"no DownloadParams.SignatureUrl for task {call_task_id}",
                                   body.get("RequestId"))
        return url

    def describe_job_group(self, job_group_id: str) -> dict[str, Any]:
        request = self._models.DescribeJobGroupRequest(instance_id=self.instance_id, job_group_id=job_group_id)
        return self._call("DescribeJobGroup", self._client.describe_job_group, request)

    def list_job_groups(self, page_number: int, page_size: int = 100,
                        start_time_ms: int | None = None) -> dict[str, Any]:
        """One page of the instance's job groups; with `start_time_ms`, only those created since
        (the API's creation-time filter, StartTime in ms)."""
        request = self._models.ListJobGroupsRequest(instance_id=self.instance_id, page_number=page_number,
                                                    page_size=page_size, start_time=start_time_ms)
        return self._call("ListJobGroups", self._client.list_job_groups, request)



def _body_of(response) -> dict[str, Any]:
    """The answer as a wire-key dict. The SDK swallows any error while building its response
    model (DaraCore.from_map) and then leaves `body` None, keeping the raw answer in `_map`: one
    malformed job (say a Conversation that is a string) would otherwise empty the whole page."""
    if response.body is not None:
        return response.body.to_map()
    raw = getattr(response, "_map", None)
    if isinstance(raw, dict) and isinstance(raw.get("body"), dict):
        return raw["body"]
    return {}


def _present(code: object) -> str | None:
    # The SDK formats the error body's Code with an f-string: a body without one gives "None".
    text = str(code).strip() if code is not None else ""
    return text if text and text != "None" else None


def _to_error(action: str, exc: TeaException) -> OutboundBotError:
    data = getattr(exc, "data", None) or {}
    code = _present(getattr(exc, "code", None)) or (_present(data.get("Code")) if isinstance(data, dict) else None)
    message = data.get("Message") if isinstance(data, dict) and data.get("Message") else None
    if message is None:
        inner = getattr(exc, "inner_exception", None)
        message = str(inner or getattr(exc, "message", None) or exc)
    request_id = getattr(exc, "request_id", None) or (data.get("RequestId") if isinstance(data, dict) else None)
    status = getattr(exc, "status_code", None)
    retryable = (
        isinstance(exc, UnretryableException)
        or code in RETRYABLE_CODES
        or (isinstance(status, int) and status >= 500)
    )
    if code is None and isinstance(status, int):
        message = f"HTTP {status}: {message}"
    if isinstance(exc, UnretryableException) and code is None:
        code = "NetworkError" if "timed out" in message.lower() or "connect" in message.lower() else "BadResponse"
    return OutboundBotError(action, code, message[:500], request_id, retryable=retryable)
