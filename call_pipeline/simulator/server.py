"""Local HTTP simulator of Alibaba Cloud OutboundBot (2019-12-26, RPC) and DashScope / Bailian.

The unmodified SDKs talk to it: ``alibabacloud_outboundbot20191226`` with
``Config(endpoint=handle.endpoint, protocol="http")`` and ``dashscope`` with
``base_address=handle.dashscope_base_url`` (or ``dashscope.base_http_api_url``).

Control plane (JSON over HTTP; each also a method of ``SimulatorState``):

=====================================  ==========================================================
``POST   /__sim/faults``               inject a fault (body: one fault dict, or a list) → ``inject_fault``
``GET    /__sim/faults``               pending faults
``DELETE /__sim/faults``               clear faults → ``clear_faults``
``POST   /__sim/latency``              ``{"outboundbot_ms": 30, "dashscope_ms": 500}`` → ``set_latency``
``POST   /__sim/qps``                  ``{"cap": 50}`` (null: no cap) → ``set_qps_cap``
``GET    /__sim/stats``                counters → ``stats``
``POST   /__sim/reset_stats``          → ``reset_stats``
``POST   /__sim/job_groups``           a job group dict, or ``{"job_groups": [...]}`` → ``add_job_group``
``GET    /__sim/job_groups``           ids and job counts of the loaded groups
``POST   /__sim/jobs``                 ``{"job_group_id": .., "jobs": [...]}`` (late jobs) → ``add_jobs``
``POST   /__sim/advance``              ``{"job_group_id": .., "steps": 1, "job_ids": null}`` → ``advance``
``POST   /__sim/job_status``           ``{"job_id": .., "status": .., ...}`` → ``set_job_status``
``GET    /__sim/llm_requests``         DashScope request bodies received → ``llm_requests``
``POST   /__sim/reset``                forget everything (groups, faults, latency, cap, stats) → ``reset``
``GET    /__sim/health``               ``{"ok": true}``
=====================================  ==========================================================

A fault dict (every key optional)::

    {"action": "ListJobs",     # an OutboundBot action; "*" = any OutboundBot action; "dashscope" =
                               # any DashScope call; "Generation" | "Application" | "ChatCompletions"
     "status": 400, "code": "Throttling.User", "message": "...",   # defaults by status (see _DEFAULT_CODES)
     "times": 1,               # how many matching requests get it; null = every one until cleared
     "headers": {"x-acs-retry-after": "200"},
     "latency_ms": 0,          # extra delay; a fault with ONLY latency delays the normal answer
     "raw_body": "<html>bad gateway</html>",   # a non-JSON body (status defaults to 502)
     "success_false": false,   # OutboundBot: HTTP 200 with Success:false, Code, HttpStatusCode=status|400
     "llm_content": "...",     # DashScope: HTTP 200 whose answer content is this text
     "job_ids": [...],         # OutboundBot: only requests that name one of these jobs (JobId, JobId.N,
                               # or the TaskId of one of their tasks)
     "job_group_id": "...",    # OutboundBot: only requests for this JobGroupId
     "match_text": "..."}      # DashScope: only requests whose body contains this text

The QPS cap counts OutboundBot requests per wall-clock second (``int(time.time())``); requests past
the cap in that second get ``400 Throttling.User``. Control-plane and recording requests are not
counted and never faulted.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import re
import socket
import threading
import time
import uuid
import wave
from collections import Counter
from dataclasses import asdict, dataclass, field
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from call_pipeline.simulator import llm_standin, scenarios

JSON_CT = "application/json;charset=utf-8"
MAX_LLM_REQUESTS_KEPT = 10_000
OB_HOST_ID = "outboundbot.cn-shanghai.aliyuncs.com"
TERMINAL = set(scenarios.TERMINAL_JOB_STATUSES)
GENERATION_PATH = "/services/aigc/text-generation/generation"
_APP_RE = re.compile(r"/apps/([^/]+)/completion$")

_DEFAULT_CODES = {
    400: ("InvalidParameter", "The specified parameter is invalid."),
    401: ("InvalidApiKey", "Invalid API-key provided."),
    403: ("Forbidden.RAM", "User not authorized to operate on the specified resource."),
    404: ("InvalidAction.NotFound", "Specified api is not found, please check your url and method."),
    429: ("Throttling", "Request was denied due to flow control."),
    500: ("InternalError", "The request processing has failed due to some unknown error."),
    502: ("BadGateway", "Bad gateway."),
    503: ("ServiceUnavailable", "The request has failed due to a temporary failure of the server."),
}
_DS_DEFAULT_CODES = {
    400: ("InvalidParameter", "Input data is invalid."),
    401: ("InvalidApiKey", "Invalid API-key provided."),
    429: ("Throttling.RateQuota", "Requests rate limit exceeded, please try again later."),
    500: ("InternalError",
          "An internal error has occured, please try again later or contact service support."),
    503: ("ServiceUnavailable", "The service is temporarily unavailable."),
}
_KNOWN_MESSAGES = {
    "Throttling.User": "Request was denied due to user flow control.",
    "DataInspectionFailed": "Input data may contain inappropriate content.",
    "Throttling.AllocationQuota": "Allocated quota exceeded, please increase your quota limit.",
}
_JOB_STATUS_NAMES = {"Scheduling": "调度中", "Executing": "执行中", "Succeeded": "已完成-已触达",
                     "Paused": "已暂停", "Failed": "已完成-未触达", "Cancelled": "已取消", "Drafted": "草稿"}
_END_REASONS = {"1": "FINISHED", "2": "CHATBOT_HANGUP_AFTER_NOANSWER", "3": "CHATBOT_HANGUP_AFTER_SILENCE",
                "4": "CLIENT_HANGUP_AFTER_NOANSWER", "5": "CLIENT_HANGUP", "6": "TRANSFER_BY_INTENT",
                "7": "TRANSFER_AFTER_NOANSWER", "8": "INO_INTERACTION", "9": "ERROR"}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@dataclass
class SimResponse:
    status: int
    body: bytes = b""
    content_type: str = JSON_CT
    headers: dict[str, str] = field(default_factory=dict)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Fault:
    action: str = "*"
    status: int | None = None
    code: str | None = None
    message: str | None = None
    times: int | None = 1
    headers: dict[str, str] = field(default_factory=dict)
    latency_ms: float = 0
    raw_body: str | None = None
    success_false: bool = False
    llm_content: str | None = None
    job_ids: list[str] | None = None
    job_group_id: str | None = None
    page_number: int | None = None  # ListJobsByGroup: only this page
    match_text: str | None = None
    id: int = 0
    hits: int = 0

    @property
    def latency_only(self) -> bool:
        return (self.status is None and self.code is None and self.raw_body is None
                and not self.success_false and self.llm_content is None)


def ob_error_body(code: str, message: str, request_id: str | None = None) -> bytes:
    return _dumps({"RequestId": request_id or _request_id(), "HostId": OB_HOST_ID, "Code": code,
                   "Message": message,
                   "Recommend": f"https://next.api.aliyun.com/troubleshoot?q={code}&product=OutboundBot"})


def ds_error_body(code: str, message: str) -> bytes:
    return _dumps({"request_id": str(uuid.uuid4()), "code": code, "message": message})


def _request_id() -> str:
    return str(uuid.uuid4()).upper()


# ---------------------------------------------------------------------------------------------
# Query parameter helpers (everything arrives as strings in the query)


def _int(params: dict[str, str], name: str, default: int | None = None) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, "InvalidParameter",
                       f"The parameter {name} is not a valid integer: {raw}") from None


def _bool(params: dict[str, str], name: str) -> bool | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    return raw.strip().lower() in ("true", "1", "yes")


def _indexed_list(params: dict[str, str], name: str) -> list[str]:
    prefix = name + "."
    items = []
    for k, v in params.items():
        if k.startswith(prefix) and k[len(prefix):].isdigit():
            items.append((int(k[len(prefix):]), v))
    return [v for _, v in sorted(items)]


def _str_list(raw: str | None) -> list[str]:
    """A filter given as a JSON array string or as comma-separated values (both are seen in the docs)."""
    if not raw:
        return []
    raw = raw.strip()
    if raw.startswith("["):
        try:
            return [str(x) for x in json.loads(raw)]
        except ValueError:
            pass
    return [p.strip() for p in raw.split(",") if p.strip()]


def _tasks(job: dict) -> list[dict]:
    tasks = job.get("Tasks")
    return [t for t in tasks if isinstance(t, dict)] if isinstance(tasks, list) else []


def _last_task(job: dict) -> dict | None:
    tasks = _tasks(job)
    return tasks[-1] if tasks else None


def _first_contact(job: dict) -> dict:
    contacts = job.get("Contacts")
    if isinstance(contacts, list) and contacts and isinstance(contacts[0], dict):
        return contacts[0]
    return {}


def wav_bytes(seed_text: str, seconds: float = 0.25, rate: int = 8000) -> bytes:
    """A short valid 8 kHz mono 16-bit WAV (a tone whose pitch depends on the task id)."""
    freq = 300 + int(hashlib.md5(seed_text.encode()).hexdigest()[:4], 16) % 600
    n = int(seconds * rate)
    frames = b"".join(int(8000 * math.sin(2 * math.pi * freq * i / rate)).to_bytes(2, "little", signed=True)
                      for i in range(n))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------


class SimulatorState:
    """Everything the simulator knows; thread-safe (one re-entrant lock guards all of it)."""

    def __init__(self, *, seed: int = 0) -> None:
        self._expired_urls_to_give = 0
        self.seed = seed
        self._lock = threading.RLock()
        self._groups: dict[str, dict] = {}
        self._group_jobs: dict[str, list[str]] = {}
        self._jobs: dict[str, dict] = {}
        self._plans: dict[str, dict] = {}
        self._task_to_job: dict[str, str] = {}
        self._faults: list[Fault] = []
        self._fault_seq = 0
        self.outboundbot_latency_ms = 0.0
        self.dashscope_latency_ms = 0.0
        self.qps_cap: int | None = None
        self._reset_stats_locked()

    # -- data ----------------------------------------------------------------------------------

    def add_job_group(self, group: dict) -> str:
        """Loads (or replaces) a job group in the scenario format (see ``scenarios``)."""
        group = copy.deepcopy(group)
        gid = str(group.get("JobGroupId") or "")
        if not gid:
            raise ValueError("a job group needs a JobGroupId")
        jobs = group.pop("jobs", None)
        if jobs is None:
            jobs = group.pop("Jobs", [])
        with self._lock:
            self._check_new_jobs(jobs, replacing=set(self._group_jobs.get(gid, [])))
            for job_id in self._group_jobs.pop(gid, []):
                self._forget_job(job_id)
            group.setdefault("JobGroupName", gid)
            group.setdefault("CreationTime", scenarios.DEFAULT_BASE_TIME_MS - 3_600_000)
            self._groups[gid] = group
            self._group_jobs[gid] = []
            self._add_jobs_locked(gid, jobs)
        return gid

    def load_scenario(self, scenario: dict | list) -> list[str]:
        """``{"job_groups": [...]}``, a list of groups, or one group."""
        if isinstance(scenario, dict) and "job_groups" in scenario:
            groups = scenario["job_groups"]
        elif isinstance(scenario, dict):
            groups = [scenario]
        else:
            groups = scenario
        return [self.add_job_group(g) for g in groups]

    def add_jobs(self, job_group_id: str, jobs: list[dict]) -> int:
        """Appends jobs to an existing group (jobs that show up late, as job groups fill asynchronously)."""
        with self._lock:
            if job_group_id not in self._groups:
                raise KeyError(f"unknown job group {job_group_id!r}")
            return self._add_jobs_locked(job_group_id, copy.deepcopy(jobs))

    def _check_new_jobs(self, jobs: list[dict], replacing: set[str] = frozenset()) -> None:
        seen: set[str] = set()
        for job in jobs:
            job_id = str(job.get("JobId") or "") if isinstance(job, dict) else ""
            if not job_id:
                raise ValueError("every job must be a dict with a JobId")
            if job_id in seen or (job_id in self._jobs and job_id not in replacing):
                raise ValueError(f"duplicate JobId {job_id!r}")
            seen.add(job_id)

    def _add_jobs_locked(self, gid: str, jobs: list[dict]) -> int:
        self._check_new_jobs(jobs, replacing=set())
        for job in jobs:
            meta = job.pop("_sim", None) or {}
            job.setdefault("JobGroupId", gid)
            job_id = str(job["JobId"])
            self._jobs[job_id] = job
            self._group_jobs[gid].append(job_id)
            if meta.get("outcome"):
                self._plans[job_id] = meta["outcome"]
            self._index_tasks(job)
        return len(jobs)

    def _forget_job(self, job_id: str) -> None:
        job = self._jobs.pop(job_id, None)
        self._plans.pop(job_id, None)
        if job:
            for t in _tasks(job):
                self._task_to_job.pop(str(t.get("TaskId")), None)

    def _index_tasks(self, job: dict) -> None:
        for t in _tasks(job):
            if t.get("TaskId"):
                self._task_to_job[str(t["TaskId"])] = str(job["JobId"])

    def get_job(self, job_id: str) -> dict | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return copy.deepcopy(job) if job is not None else None

    def jobs_of_group(self, job_group_id: str) -> list[dict]:
        with self._lock:
            return [copy.deepcopy(self._jobs[j]) for j in self._group_jobs.get(job_group_id, [])]

    def job_group_ids(self) -> list[str]:
        with self._lock:
            return list(self._groups)

    def advance(self, job_group_id: str, steps: int = 1, job_ids: list[str] | None = None) -> dict:
        """Moves the group's jobs on by ``steps``: Drafted → Scheduling → Executing → final status.

        The final status, tasks and transcript come from the job's planned outcome (built by
        ``scenarios``), or a deterministic default one. Terminal and Paused jobs do not move.
        Returns ``{"moved": n, "statuses": {status: count}}`` after the last step.
        """
        moved = 0
        with self._lock:
            if job_group_id not in self._groups:
                raise KeyError(f"unknown job group {job_group_id!r}")
            wanted = set(job_ids) if job_ids else None
            for _ in range(max(0, int(steps))):
                for job_id in self._group_jobs[job_group_id]:
                    if wanted is None or job_id in wanted:
                        moved += self._step_job(self._jobs[job_id])
            statuses = Counter(str(self._jobs[j].get("Status")) for j in self._group_jobs[job_group_id])
        return {"moved": moved, "statuses": dict(statuses)}

    def _plan(self, job: dict) -> dict:
        job_id = str(job["JobId"])
        if job_id not in self._plans:
            self._plans[job_id] = scenarios.default_outcome(job, seed=self.seed)
        return self._plans[job_id]

    def _step_job(self, job: dict) -> int:
        status = job.get("Status")
        if status == "Drafted":
            job["Status"] = "Scheduling"
        elif status == "Scheduling":
            in_flight = scenarios.executing_task(self._plan(job))
            prior = [t for t in _tasks(job) if t.get("Status") != "Executing"]
            job["Tasks"] = prior + ([in_flight] if in_flight else [])
            job["Status"] = "Executing"
        elif status == "Executing":
            plan = self._plan(job)
            job.update(Status=plan["Status"], FailureReason=plan.get("FailureReason", ""),
                       Tasks=copy.deepcopy(plan.get("Tasks", [])),
                       Summary=copy.deepcopy(plan.get("Summary", [])))
        else:
            return 0
        self._index_tasks(job)
        return 1

    def set_job_status(self, job_id: str, status: str, *, failure_reason: str | None = None,
                       tasks: list[dict] | None = None, conversation: Any = None) -> dict:
        """Sets a job's Status (and optionally FailureReason, Tasks, or the last task's Conversation).

        Moving a Scheduling/Executing job to the status of its planned outcome without ``tasks``
        applies the outcome's tasks too, so the job looks like a finished call.
        """
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise KeyError(f"unknown job {job_id!r}")
            plan = self._plans.get(job_id)
            if (tasks is None and plan and job.get("Status") in ("Scheduling", "Executing", "Drafted")
                    and plan.get("Status") == status):
                tasks = copy.deepcopy(plan.get("Tasks", []))
                if failure_reason is None:
                    failure_reason = plan.get("FailureReason", "")
            job["Status"] = status
            if failure_reason is not None:
                job["FailureReason"] = failure_reason
            if tasks is not None:
                job["Tasks"] = copy.deepcopy(tasks)
            if conversation is not None:
                last = _last_task(job)
                if last is None:
                    raise ValueError(f"job {job_id!r} has no task to put a conversation on")
                last["Conversation"] = copy.deepcopy(conversation)
            self._index_tasks(job)
            return copy.deepcopy(job)

    # -- faults, latency, cap ------------------------------------------------------------------

    def inject_fault(self, **fault: Any) -> dict:
        """Queues a fault (keys as in the module docstring); returns it with its id."""
        unknown = set(fault) - {f for f in Fault.__dataclass_fields__ if f not in ("id", "hits")}
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}")
        f = Fault(**fault)
        if f.status is not None:
            f.status = int(f.status)
        if f.times is not None and int(f.times) < 1:
            raise ValueError("times must be >= 1, or null for every matching request")
        if f.latency_only and not f.latency_ms:
            raise ValueError("a fault needs an effect: status, code, raw_body, success_false, llm_content "
                             "or latency_ms")
        if f.job_ids is not None:
            f.job_ids = [str(j) for j in f.job_ids]
        f.headers = {str(k): str(v) for k, v in (f.headers or {}).items()}
        with self._lock:
            self._fault_seq += 1
            f.id = self._fault_seq
            self._faults.append(f)
            return asdict(f)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def faults(self) -> list[dict]:
        with self._lock:
            return [asdict(f) for f in self._faults]

    def set_latency(self, outboundbot_ms: float | None = None, dashscope_ms: float | None = None) -> None:
        """Per-API delay before every answer (None leaves a value unchanged)."""
        with self._lock:
            if outboundbot_ms is not None:
                self.outboundbot_latency_ms = float(outboundbot_ms)
            if dashscope_ms is not None:
                self.dashscope_latency_ms = float(dashscope_ms)

    def expire_next_recording_urls(self, count: int) -> None:
        """The next `count` DownloadRecording answers carry a SignatureUrl that has expired."""
        with self._lock:
            self._expired_urls_to_give = int(count)

    def set_qps_cap(self, cap: int | None) -> None:
        with self._lock:
            self.qps_cap = None if cap is None else int(cap)

    def _take_fault(self, kind: str, action: str, *, job_ids: set[str] | None = None,
                    job_group_id: str | None = None, page_number: int | None = None,
                    text: str | None = None) -> Fault | None:
        for f in self._faults:
            target = f.action.lower()
            if kind == "outboundbot":
                if target not in ("*", action.lower()):
                    continue
                if f.job_ids is not None and not (job_ids and job_ids & set(f.job_ids)):
                    continue
                if f.job_group_id is not None and f.job_group_id != job_group_id:
                    continue
                if f.page_number is not None and f.page_number != page_number:
                    continue
            else:
                if target not in ("dashscope", action.lower()):
                    continue
                if f.match_text is not None and (text is None or f.match_text not in text):
                    continue
            f.hits += 1
            if f.times is not None:
                f.times -= 1
                if f.times <= 0:
                    self._faults.remove(f)
            self._stats["faults_injected"] += 1
            return copy.copy(f)
        return None

    # -- stats ---------------------------------------------------------------------------------

    def _reset_stats_locked(self) -> None:
        self._stats: dict[str, Any] = {"throttled": 0, "faults_injected": 0, "recording_downloads": 0,
                                       "dashscope_requests": 0, "max_llm_in_flight": 0,
                                       "max_outboundbot_in_flight": 0}
        self._action_counts: Counter[str] = Counter()
        self._ds_counts: Counter[str] = Counter()
        self._per_second: Counter[int] = Counter()
        self._arrivals: list[float] = []
        self._llm_in_flight = 0
        self._ob_in_flight = 0
        self._llm_requests: list[dict] = []
        # DownloadRecording calls per TaskId, to tell a repeated call
        self._downloads_by_task: Counter[str] = Counter()

    def reset_stats(self) -> None:
        with self._lock:
            llm_in_flight, ob_in_flight = self._llm_in_flight, self._ob_in_flight
            self._reset_stats_locked()
            self._llm_in_flight, self._ob_in_flight = llm_in_flight, ob_in_flight

    def reset(self) -> None:
        """Forgets all groups, faults, latency and the QPS cap, and resets the stats."""
        with self._lock:
            self._groups.clear()
            self._group_jobs.clear()
            self._jobs.clear()
            self._plans.clear()
            self._task_to_job.clear()
            self._faults.clear()
            self.outboundbot_latency_ms = self.dashscope_latency_ms = 0.0
            self.qps_cap = None
            self.reset_stats()

    @property
    def llm_requests(self) -> list[dict]:
        """The DashScope request bodies received so far (parsed JSON), oldest first (the last 10,000)."""
        with self._lock:
            return copy.deepcopy(self._llm_requests)

    def stats(self) -> dict:
        """``requests`` per OutboundBot action, the per-second arrival histogram and its maximum
        (``max_requests_per_second``, wall-clock seconds; ``max_requests_in_any_1s`` is the sliding
        window maximum), ``throttled`` (QPS-cap rejections), DashScope counts and in-flight maxima."""
        with self._lock:
            arrivals = self._arrivals
            best, lo = 0, 0
            for hi, t in enumerate(arrivals):
                while t - arrivals[lo] >= 1.0:
                    lo += 1
                best = max(best, hi - lo + 1)
            return {
                "requests": dict(self._action_counts),
                "outboundbot_requests": sum(self._action_counts.values()),
                "dashscope_requests": self._stats["dashscope_requests"],
                "dashscope": dict(self._ds_counts),
                "max_requests_per_second": max(self._per_second.values(), default=0),
                "max_requests_in_any_1s": best,
                "per_second": {str(k): v for k, v in sorted(self._per_second.items())},
                "throttled": self._stats["throttled"],
                "faults_injected": self._stats["faults_injected"],
                "recording_downloads": self._stats["recording_downloads"],
                "download_recording_tasks": len(self._downloads_by_task),
                "download_recording_repeats": sum(n - 1 for n in self._downloads_by_task.values()),

                "llm_in_flight": self._llm_in_flight,
                "max_llm_in_flight": self._stats["max_llm_in_flight"],
                "outboundbot_in_flight": self._ob_in_flight,
                "max_outboundbot_in_flight": self._stats["max_outboundbot_in_flight"],
                "qps_cap": self.qps_cap,
                "latency": {"outboundbot_ms": self.outboundbot_latency_ms,
                            "dashscope_ms": self.dashscope_latency_ms},
            }

    # -- OutboundBot ---------------------------------------------------------------------------

    def handle_outboundbot(self, action: str, params: dict[str, str], base_url: str) -> SimResponse:
        """One OutboundBot request, end to end: stats, QPS cap, faults, latency, then the answer."""
        now = time.time()
        with self._lock:
            self._action_counts[action] += 1
            second = int(now)
            self._per_second[second] += 1
            self._arrivals.append(time.monotonic())
            throttled = self.qps_cap is not None and self._per_second[second] > self.qps_cap
            if throttled:
                self._stats["throttled"] += 1
            fault = None
            if not throttled:
                job_ids, group_id = self._request_targets(action, params)
                if action == "DownloadRecording" and params.get("TaskId"):
                    self._downloads_by_task[params["TaskId"]] += 1
                fault = self._take_fault("outboundbot", action, job_ids=job_ids, job_group_id=group_id,
                                         page_number=_int(params, "PageNumber") if action == "ListJobsByGroup"
                                         else None)
            delay = self.outboundbot_latency_ms + (fault.latency_ms if fault else 0)
            self._ob_in_flight += 1
            self._stats["max_outboundbot_in_flight"] = max(self._stats["max_outboundbot_in_flight"],
                                                           self._ob_in_flight)
        try:
            if delay > 0:
                time.sleep(delay / 1000)
            if throttled:
                return SimResponse(400, ob_error_body("Throttling.User", _KNOWN_MESSAGES["Throttling.User"]))
            if fault is not None and not fault.latency_only:
                return self._ob_fault_response(fault)
            return self._ob_answer(action, params, base_url)
        finally:
            with self._lock:
                self._ob_in_flight -= 1

    def _request_targets(self, action: str, params: dict[str, str]) -> tuple[set[str], str | None]:
        ids = set(_indexed_list(params, "JobId"))
        if params.get("JobId"):
            ids.add(params["JobId"])
        task_id = params.get("TaskId")
        if task_id:
            ids.add(task_id)
            if task_id in self._task_to_job:
                ids.add(self._task_to_job[task_id])
        return ids, params.get("JobGroupId")

    @staticmethod
    def _ob_fault_response(f: Fault) -> SimResponse:
        if f.raw_body is not None:
            return SimResponse(f.status or 502, f.raw_body.encode("utf-8"), "text/html;charset=utf-8",
                               dict(f.headers))
        if f.success_false:
            status = f.status if f.status and f.status != 200 else 400
            code, message = _DEFAULT_CODES.get(status, ("InternalError", "Error"))
            code = f.code or code
            body = {"RequestId": _request_id(), "Success": False, "Code": code,
                    "Message": f.message or _KNOWN_MESSAGES.get(code, message), "HttpStatusCode": status}
            return SimResponse(200, _dumps(body), JSON_CT, dict(f.headers))
        status = f.status or 400
        code, message = _DEFAULT_CODES.get(status, ("InternalError", "Error"))
        code = f.code or code
        message = f.message or _KNOWN_MESSAGES.get(code, message)
        return SimResponse(status, ob_error_body(code, message), JSON_CT, dict(f.headers))

    def _ob_answer(self, action: str, params: dict[str, str], base_url: str) -> SimResponse:
        handler = _OB_ACTIONS.get(action)
        if handler is None:
            return SimResponse(404, ob_error_body("InvalidAction.NotFound",
                                                  f"Specified api is not found, please check your url and "
                                                  f"method. Action: {action}"))
        request_id = _request_id()
        try:
            with self._lock:
                payload = handler(self, params, base_url)
                body = {"RequestId": request_id, "Success": True, "Code": "OK", "Message": "",
                        "HttpStatusCode": 200, **payload}
                # Serialized under the lock: advance() may be rewriting these very job dicts.
                data = _dumps(body)
        except ApiError as e:
            return SimResponse(e.status, ob_error_body(e.code, e.message, request_id))
        return SimResponse(200, data, JSON_CT, {"x-acs-request-id": request_id})

    def _group_or_error(self, params: dict[str, str]) -> str:
        gid = params.get("JobGroupId")
        if not gid:
            raise ApiError(400, "MissingJobGroupId", "JobGroupId is mandatory for this action.")
        if gid not in self._groups:
            raise ApiError(400, "InvalidParameter", f"The specified JobGroupId does not exist: {gid}")
        return gid

    @staticmethod
    def _page(params: dict[str, str]) -> tuple[int, int]:
        number = _int(params, "PageNumber", 1) or 1
        size = _int(params, "PageSize", 10) or 10
        if number < 1 or size < 1:
            raise ApiError(400, "InvalidParameter", "PageNumber and PageSize must be positive.")
        return number, size

    def _list_jobs_by_group(self, params: dict[str, str], base_url: str) -> dict:
        gid = self._group_or_error(params)
        number, size = self._page(params)
        status, reason = params.get("JobStatus"), params.get("JobFailureReason")
        jobs = [self._jobs[j] for j in self._group_jobs[gid]]
        if status:
            jobs = [j for j in jobs if j.get("Status") == status]
        if reason:
            jobs = [j for j in jobs if j.get("FailureReason") == reason]
        page = jobs[(number - 1) * size: number * size]
        return {"Jobs": {"TotalCount": len(jobs), "PageNumber": number, "PageSize": size,
                         "List": [{k: v for k, v in j.items() if k != "Tasks"} for j in page]}}

    def _list_jobs(self, params: dict[str, str], base_url: str) -> dict:
        ids = _indexed_list(params, "JobId")
        if not ids:
            raise ApiError(400, "MissingJobId", "JobId is mandatory for this action.")
        if len(ids) > 99:
            raise ApiError(400, "InvalidParameter",
                           f"A maximum of 99 job IDs can be specified; got {len(ids)}.")
        return {"Jobs": [self._jobs[j] for j in ids if j in self._jobs]}

    def _describe_job(self, params: dict[str, str], base_url: str) -> dict:
        job_id = params.get("JobId")
        if not job_id:
            raise ApiError(400, "MissingJobId", "JobId is mandatory for this action.")
        job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(400, "InvalidParameter", f"The specified JobId does not exist: {job_id}")
        out = copy.deepcopy(job)
        out["InstanceId"] = params.get("InstanceId", "")
        last = _last_task(out)
        if last is not None:
            out.setdefault("ActualTime", last.get("ActualTime"))
            out.setdefault("CalledNumber", last.get("CalledNumber"))
            out.setdefault("EndReason", last.get("EndReason", ""))
        for t in _tasks(out):
            convo = t.get("Conversation")
            if isinstance(convo, list):
                for i, e in enumerate(convo):
                    if isinstance(e, dict):
                        e.setdefault("SequenceId", str(i + 1))
                        e.setdefault("Action", "")
                        e.setdefault("ActionParams", "")
        return {"Job": out}

    def _download_recording(self, params: dict[str, str], base_url: str) -> dict:
        task_id = params.get("TaskId")
        if not task_id:
            raise ApiError(400, "MissingTaskId", "TaskId is mandatory for this action.")
        if task_id not in self._task_to_job:
            raise ApiError(400, "InvalidParameter", f"The specified TaskId does not exist: {task_id}")
        expires = int(time.time()) + 3600
        with self._lock:
            if self._expired_urls_to_give > 0:  # a URL whose signature ran out before it was fetched
                self._expired_urls_to_give -= 1
                expires = int(time.time()) - 60
        signature = hashlib.sha1(f"{task_id}:{expires}".encode()).hexdigest()[:28]
        url = f"{base_url}/__recordings/{task_id}.wav?Expires={expires}&Signature={signature}"
        slices = "[]" if not _bool(params, "NeedVoiceSliceRecording") else json.dumps([])
        return {"DownloadParams": {"FileName": f"{task_id}.wav", "SignatureUrl": url,
                                   "EarlyMediaSignatureUrl": "", "VoiceSliceRecordingListJson": slices}}

    def _progress(self, gid: str) -> dict:
        jobs = [self._jobs[j] for j in self._group_jobs[gid]]
        counts = Counter(str(j.get("Status")) for j in jobs)
        not_answered = 0
        duration = 0
        for j in jobs:
            tasks = _tasks(j)
            duration += sum(t.get("Duration") or 0 for t in tasks if isinstance(t.get("Duration"), int))
            if str(j.get("Status")) in TERMINAL and not any(
                    str(t.get("Status", "")).startswith("Succeeded") for t in tasks):
                not_answered += 1
        completed = sum(counts[s] for s in TERMINAL)
        return {"TotalJobs": len(jobs), "TotalCompleted": completed, "Executing": counts["Executing"],
                "Scheduling": counts["Scheduling"], "Failed": counts["Failed"], "Paused": counts["Paused"],
                "Cancelled": counts["Cancelled"], "TotalNotAnswered": not_answered, "Duration": duration,
                "StartTime": self._groups[gid].get("CreationTime"), "Status": self._group_status(gid, counts),
                "Briefs": [], "Categories": []}

    def _group_status(self, gid: str, counts: Counter[str] | None = None) -> str:
        pinned = self._groups[gid].get("Status")
        if pinned:
            return str(pinned)
        if counts is None:
            counts = Counter(str(self._jobs[j].get("Status")) for j in self._group_jobs[gid])
        total = sum(counts.values())
        done = sum(counts[s] for s in TERMINAL)
        if total and done == total:
            return "Completed"
        if counts["Executing"] or done:
            return "Executing"
        return "Scheduling"

    def _strategy(self, gid: str) -> dict:
        group = self._groups[gid]
        return {"StrategyId": group.get("StrategyId", ""), "StrategyName": "工作日白天外呼",
                "StartTime": group.get("CreationTime"),
                "EndTime": (group.get("CreationTime") or 0) + 7 * 86_400_000,
                "MaxAttemptsPerDay": 2, "MinAttemptInterval": 30, "RepeatBy": "Once", "RepeatDays": [],
                "Repeatable": False, "RoutingStrategy": "LocalFirst", "Type": "Repeatable",
                "IsTemplate": False,
                "Customized": "", "FollowUpStrategy": "", "StrategyDescription": "",
                "WorkingTime": [{"BeginTime": "09:00:00", "EndTime": "12:00:00"},
                                {"BeginTime": "14:00:00", "EndTime": "20:00:00"}]}

    def _describe_job_group(self, params: dict[str, str], base_url: str) -> dict:
        gid = self._group_or_error(params)
        group = self._groups[gid]
        return {"JobGroup": {
            "JobGroupId": gid, "JobGroupName": group.get("JobGroupName", gid),
            "JobGroupDescription": group.get("JobGroupDescription", ""), "Status": self._group_status(gid),
            "CreationTime": group.get("CreationTime"), "ModifyTime": str(group.get("CreationTime")),
            "ScriptId": group.get("ScriptId", ""), "ScriptName": group.get("ScriptName", ""),
            "ScriptVersion": "1", "ScenarioId": group.get("ScenarioId", ""),
            "CallingNumbers": list(group.get("CallingNumbers", [])), "RecallCallingNumbers": [],
            "Priority": "Daily", "MinConcurrency": 0, "RingingDuration": 25,
            "Progress": self._progress(gid), "Strategy": self._strategy(gid)}}

    def _list_job_groups(self, params: dict[str, str], base_url: str) -> dict:
        number, size = self._page(params)
        wanted = set(_str_list(params.get("JobGroupStatusFilter")))
        search = params.get("SearchText") or ""
        start, end = _int(params, "StartTime"), _int(params, "EndTime")
        rows = []
        for gid, group in self._groups.items():
            p = self._progress(gid)
            created = group.get("CreationTime") or 0
            if wanted and p["Status"] not in wanted:
                continue
            if search and search not in gid and search not in str(group.get("JobGroupName", "")):
                continue
            if (start is not None and created < start) or (end is not None and created > end):
                continue
            rows.append({"JobGroupId": gid, "JobGroupName": group.get("JobGroupName", gid),
                         "JobGroupDescription": group.get("JobGroupDescription", ""), "Status": p["Status"],
                         "CreationTime": created, "ModifyTime": str(created),
                         "ScriptId": group.get("ScriptId", ""), "ScriptName": group.get("ScriptName", ""),
                         "ScriptVersion": "1", "TotalCallNum": p["TotalJobs"], "MinConcurrency": 0,
                         "Progress": {"TotalJobs": p["TotalJobs"], "TotalCompleted": p["TotalCompleted"],
                                      "ExecutingNum": p["Executing"], "FailedNum": p["Failed"],
                                      "PausedNum": p["Paused"], "CancelledNum": p["Cancelled"],
                                      "Scheduling": p["Scheduling"], "Duration": p["Duration"],
                                      "StartTime": p["StartTime"], "Status": p["Status"],
                                      "TotalNotAnswered": p["TotalNotAnswered"]},
                         "Strategy": {"StartTime": created, "EndTime": created + 7 * 86_400_000}})
        page = rows[(number - 1) * size: number * size]
        return {"AsyncTaskId": "",
                "JobGroups": {"TotalCount": len(rows), "PageNumber": number, "PageSize": size, "List": page}}

    def _query_jobs_with_result(self, params: dict[str, str], base_url: str) -> dict:
        gid = self._group_or_error(params)
        number, size = self._page(params)
        job_status = set(_str_list(params.get("JobStatusFilter")))
        task_status = set(_str_list(params.get("TaskStatusFilter")))
        reasons = set(_str_list(params.get("JobFailureReasonsFilter")))
        answered = _bool(params, "HasAnsweredFilter")
        rejected = _bool(params, "HasHangUpByRejectionFilter")
        reached_end = _bool(params, "HasReachedEndOfFlowFilter")
        t_from, t_to = _int(params, "StartActualTimeFilter"), _int(params, "EndActualTimeFilter")
        text = params.get("QueryText") or ""
        rows = []
        for job_id in self._group_jobs[gid]:
            row = self._result_row(self._jobs[job_id])
            latest = row.get("LatestTask") or {}
            if job_status and row["Status"] not in job_status:
                continue
            if task_status and latest.get("Status") not in task_status:
                continue
            if reasons and row["JobFailureReason"] not in reasons:
                continue
            if answered is not None and bool(latest.get("HasAnswered")) != answered:
                continue
            if rejected is not None and bool(latest.get("HasHangUpByRejection")) != rejected:
                continue
            if reached_end is not None and bool(latest.get("HasReachedEndOfFlow")) != reached_end:
                continue
            call_time = latest.get("CallTime")
            if t_from is not None and not (isinstance(call_time, int) and call_time >= t_from):
                continue
            if t_to is not None and not (isinstance(call_time, int) and call_time <= t_to):
                continue
            if text:
                contact = latest.get("Contact") or {}
                hay = " ".join(str(contact.get(k, "")) for k in ("PhoneNumber", "ReferenceId", "Name"))
                if text not in hay and text not in re.sub(r"\D", "", hay):
                    continue
            rows.append(row)
        page = rows[(number - 1) * size: number * size]
        return {"Jobs": {"PageNumber": number, "PageSize": size, "RowCount": len(rows),
                         "PageCount": (len(rows) + size - 1) // size, "List": page},
                "VariableNames": ["意向"], "Labels": [{"Name": "意向", "ValueList": ["有", "无", "未知"]}]}

    @staticmethod
    def _result_row(job: dict) -> dict:
        status = str(job.get("Status"))
        row: dict[str, Any] = {"Id": job.get("JobId"), "Status": status,
                               "StatusName": _JOB_STATUS_NAMES.get(status, status),
                               "JobFailureReason": job.get("FailureReason", "")}
        last = _last_task(job)
        if last is None:
            return row
        contact = last.get("Contact") if isinstance(last.get("Contact"), dict) else _first_contact(job)
        t_status = str(last.get("Status", ""))
        duration = last.get("Duration") if isinstance(last.get("Duration"), int) else 0
        answered = t_status.startswith("Succeeded")
        summary = job.get("Summary") if isinstance(job.get("Summary"), list) else []
        row["LatestTask"] = {
            "CallTime": last.get("ActualTime") or last.get("PlanedTime"), "CallDuration": duration,
            "CallDurationDisplay": f"{duration // 60:02d}:{duration % 60:02d}", "Status": t_status,
            "StatusName": t_status, "TaskEndReason": _END_REASONS.get(str(last.get("EndReason", "")), ""),
            "HasAnswered": answered, "HasHangUpByRejection": t_status == "SucceededClientHangUp",
            "HasReachedEndOfFlow": t_status == "SucceededFinish",
            "HasLastPlaybackCompleted": t_status == "SucceededFinish",
            "HangUpDirection": last.get("HangUpDirection", ""), "VoiceName": "xiaoyun",
            "Contact": {"Id": contact.get("ContactId"), "Name": contact.get("ContactName"),
                        "Honorific": contact.get("Honorific"), "PhoneNumber": contact.get("PhoneNumber"),
                        "PreferredPhoneNumber": contact.get("PhoneNumber"),
                        "ReferenceId": contact.get("ReferenceId"), "JobUuid": job.get("JobId"),
                        "Role": contact.get("Role", ""), "Round": len(_tasks(job)),
                        "State": contact.get("State", "")},
            "Extras": [{"Key": s.get("SummaryName"), "Value": s.get("Content")} for s in summary
                       if isinstance(s, dict)],
            "TagHits": [], "DialExceptionCodes": []}
        return row

    def recording(self, task_id: str, query: dict[str, str]) -> SimResponse:
        with self._lock:
            known = task_id in self._task_to_job
            if known:
                self._stats["recording_downloads"] += 1
        if not known:
            return SimResponse(404, b"<Error><Code>NoSuchKey</Code></Error>", "application/xml")
        expires = query.get("Expires")
        if expires and expires.isdigit() and int(expires) < time.time():
            return SimResponse(403, b"<Error><Code>AccessDenied</Code><Message>Request has expired."
                                    b"</Message></Error>", "application/xml")
        return SimResponse(200, wav_bytes(task_id), "audio/wav")

    # -- DashScope -----------------------------------------------------------------------------

    def handle_dashscope(self, endpoint: str, app_id: str | None, headers: Message,
                         raw: bytes) -> SimResponse:
        """One DashScope call (endpoint: "Generation", "Application" or "ChatCompletions")."""
        with self._lock:
            self._stats["dashscope_requests"] += 1
            self._ds_counts[endpoint] += 1
            self._llm_in_flight += 1
            self._stats["max_llm_in_flight"] = max(self._stats["max_llm_in_flight"], self._llm_in_flight)
        try:
            return self._dashscope(endpoint, app_id, headers, raw)
        finally:
            with self._lock:
                self._llm_in_flight -= 1

    def _dashscope(self, endpoint: str, app_id: str | None, headers: Message, raw: bytes) -> SimResponse:
        compat = endpoint == "ChatCompletions"
        text = raw.decode("utf-8", errors="replace")
        try:
            body = json.loads(text) if text.strip() else {}
        except ValueError:
            body = None
        with self._lock:
            if isinstance(body, dict):
                self._llm_requests.append(copy.deepcopy(body))
                if len(self._llm_requests) > MAX_LLM_REQUESTS_KEPT:  # a long-running demo must not grow forever
                    del self._llm_requests[: len(self._llm_requests) - MAX_LLM_REQUESTS_KEPT]
        auth = headers.get("Authorization") or ""
        if not auth.startswith("Bearer ") or not auth[len("Bearer "):].strip():
            return self._ds_error(401, "InvalidApiKey", "Invalid API-key provided.", compat)
        with self._lock:
            fault = self._take_fault("dashscope", endpoint, text=text)
            delay = self.dashscope_latency_ms + (fault.latency_ms if fault else 0)
        if delay > 0:
            time.sleep(delay / 1000)
        if fault is not None and not fault.latency_only and fault.llm_content is None:
            if fault.raw_body is not None:
                return SimResponse(fault.status or 502, fault.raw_body.encode("utf-8"),
                                   "text/html;charset=utf-8", dict(fault.headers))
            status = fault.status or 500
            code, message = _DS_DEFAULT_CODES.get(status) or _DEFAULT_CODES.get(status) or ("InternalError",
                                                                                            "Error")
            code = fault.code or code
            resp = self._ds_error(status, code, fault.message or _KNOWN_MESSAGES.get(code, message), compat)
            resp.headers.update(fault.headers)
            return resp
        if not isinstance(body, dict):
            return self._ds_error(400, "InvalidParameter", "Request body is not valid JSON.", compat)

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
            return self._ds_error(400, "InvalidParameter", "Input messages or prompt must not be empty.",
                                  compat)
        messages = [m if isinstance(m, dict) else {"role": "user", "content": str(m)} for m in messages]
        response_format = params.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") == "json_object":
            all_text = " ".join(llm_standin.content_text(m.get("content")) for m in messages)
            if "json" not in all_text.lower():
                return self._ds_error(400, "InvalidParameter",
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
            return SimResponse(200, _dumps({
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
            return SimResponse(200, _dumps({"request_id": request_id, "output": output(content, "stop"),
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

    @staticmethod
    def _ds_error(status: int, code: str, message: str, compat: bool) -> SimResponse:
        if compat:
            body = _dumps({"error": {"message": message, "type": code, "param": None, "code": code},
                           "request_id": str(uuid.uuid4())})
            return SimResponse(status, body, "application/json")
        return SimResponse(status, ds_error_body(code, message), "application/json")


_OB_ACTIONS = {
    "ListJobsByGroup": SimulatorState._list_jobs_by_group,
    "ListJobs": SimulatorState._list_jobs,
    "DescribeJob": SimulatorState._describe_job,
    "DescribeJobGroup": SimulatorState._describe_job_group,
    "DownloadRecording": SimulatorState._download_recording,
    "QueryJobsWithResult": SimulatorState._query_jobs_with_result,
    "ListJobGroups": SimulatorState._list_job_groups,
}
OUTBOUNDBOT_ACTIONS = tuple(_OB_ACTIONS)


# ---------------------------------------------------------------------------------------------
# HTTP layer


def _control(state: SimulatorState, method: str, path: str, body: Any) -> tuple[int, Any]:
    b = body if isinstance(body, dict) else {}
    route = (method, path.rstrip("/"))
    if route == ("GET", "/__sim/health"):
        return 200, {"ok": True}
    if route == ("POST", "/__sim/faults"):
        faults = body if isinstance(body, list) else [b]
        return 200, {"ok": True, "faults": [state.inject_fault(**f) for f in faults]}
    if route == ("GET", "/__sim/faults"):
        return 200, {"faults": state.faults}
    if route == ("DELETE", "/__sim/faults"):
        state.clear_faults()
        return 200, {"ok": True}
    if route == ("POST", "/__sim/latency"):
        state.set_latency(b.get("outboundbot_ms"), b.get("dashscope_ms"))
        return 200, {"ok": True, "outboundbot_ms": state.outboundbot_latency_ms,
                     "dashscope_ms": state.dashscope_latency_ms}
    if route == ("POST", "/__sim/qps"):
        state.set_qps_cap(b.get("cap"))
        return 200, {"ok": True, "cap": state.qps_cap}
    if route == ("GET", "/__sim/stats"):
        return 200, state.stats()
    if route == ("POST", "/__sim/reset_stats"):
        state.reset_stats()
        return 200, {"ok": True}
    if route == ("POST", "/__sim/reset"):
        state.reset()
        return 200, {"ok": True}
    if route == ("POST", "/__sim/job_groups"):
        return 200, {"ok": True, "job_group_ids": state.load_scenario(body)}
    if route == ("GET", "/__sim/job_groups"):
        return 200, {"job_groups": [{"JobGroupId": g, "jobs": len(state.jobs_of_group(g))}
                                    for g in state.job_group_ids()]}
    if route == ("POST", "/__sim/jobs"):
        return 200, {"ok": True, "added": state.add_jobs(b["job_group_id"], b.get("jobs", []))}
    if route == ("POST", "/__sim/advance"):
        return 200, {"ok": True, **state.advance(b["job_group_id"], int(b.get("steps", 1)), b.get("job_ids"))}
    if route == ("POST", "/__sim/job_status"):
        job = state.set_job_status(b["job_id"], b["status"], failure_reason=b.get("failure_reason"),
                                   tasks=b.get("tasks"), conversation=b.get("conversation"))
        return 200, {"ok": True, "job": job}
    if route == ("GET", "/__sim/llm_requests"):
        return 200, {"llm_requests": state.llm_requests}
    if route[1].startswith("/__sim/jobs/") and method == "GET":
        job = state.get_job(route[1].rsplit("/", 1)[1])
        return (200, job) if job is not None else (404, {"ok": False, "error": "unknown job"})
    return 404, {"ok": False, "error": f"no control endpoint {method} {path}"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: both SDKs pool connections
    server_version = "CallPipelineSimulator/1.0"
    # TCP_NODELAY on the accepted socket (StreamRequestHandler.setup); without it, Nagle plus the
    # client's delayed ACK adds ~40 ms to every keep-alive round trip.
    disable_nagle_algorithm = True
    server: SimulatorHTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence per-request logging
        pass

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def _read_body(self) -> bytes:
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        try:
            raw = self._read_body()
            resp = self._route(raw)
        except Exception as exc:  # a simulator bug must still answer, or the client hangs to its timeout
            resp = SimResponse(500, ob_error_body("InternalError", f"simulator error: {exc!r}"))
        self._send(resp)

    def _route(self, raw: bytes) -> SimResponse:
        state = self.server.state
        parts = urlsplit(self.path)
        path = parts.path or "/"
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        if path.startswith("/__sim/"):
            try:
                body = json.loads(raw) if raw.strip() else {}
                status, payload = _control(state, self.command, path, body)
            except (ValueError, KeyError, TypeError) as e:
                status, payload = 400, {"ok": False, "error": f"{type(e).__name__}: {e}"}
            return SimResponse(status, _dumps(payload))
        if path.startswith("/__recordings/"):
            name = path[len("/__recordings/"):]
            return state.recording(name[:-4] if name.endswith(".wav") else name, query)
        if path.endswith(GENERATION_PATH):
            return state.handle_dashscope("Generation", None, self.headers, raw)
        m = _APP_RE.search(path)
        if m:
            return state.handle_dashscope("Application", m.group(1), self.headers, raw)
        if path.endswith("/compatible-mode/v1/chat/completions"):
            return state.handle_dashscope("ChatCompletions", None, self.headers, raw)
        action = self.headers.get("x-acs-action") or query.get("Action")
        if action:
            return state.handle_outboundbot(action, query, self._base_url())
        if path == "/":
            return SimResponse(404, ob_error_body("InvalidAction.NotFound", "No action given (x-acs-action header "
                                                                            "or Action query parameter)."))
        return SimResponse(404, ob_error_body("InvalidApi.NotFound", f"No such path: {path}"))

    def _base_url(self) -> str:
        host = self.headers.get("Host")
        if host and "://" not in host:
            return f"http://{host}"
        return self.server.url

    def _send(self, resp: SimResponse) -> None:
        try:
            reason = HTTPStatus(resp.status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {resp.status} {reason}", f"Server: {self.server_version}",
                 f"Content-Type: {resp.content_type}", f"Content-Length: {len(resp.body)}"]
        lines += [f"{k}: {v}" for k, v in resp.headers.items()]
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", errors="replace")
        try:
            # One write of head+body: one TCP segment burst, no Nagle/delayed-ACK interplay.
            self.wfile.write(head + (b"" if self.command == "HEAD" else resp.body))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (e.g. its read timeout); nothing to do


class SimulatorHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Handler threads idle on keep-alive sockets; server_close() must not wait for them.
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], state: SimulatorState) -> None:
        self.state = state
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)
        host, port = self.server_address[:2]
        self.url = f"http://{host}:{port}"

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can stall offline.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def track(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.discard(conn)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


class SimulatorHandle:
    """A running simulator: ``url``, ``host``, ``port``, ``endpoint`` (for the OutboundBot SDK Config),
    ``dashscope_base_url`` (for dashscope's ``base_address``), ``state``; ``stop()``; a context manager."""

    def __init__(self, server: SimulatorHTTPServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host: str = str(server.server_address[0])
        self.port: int = int(server.server_address[1])
        self.url = f"http://{self.host}:{self.port}"
        self.endpoint = f"{self.host}:{self.port}"
        self.dashscope_base_url = f"{self.url}/api/v1"
        self.compatible_base_url = f"{self.url}/compatible-mode/v1"
        self.state: SimulatorState = server.state
        self._stopped = False

    def stop(self) -> None:
        """Stops serving and drops open keep-alive connections (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._server.close_connections()
        self._thread.join(timeout=5)

    def __enter__(self) -> SimulatorHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SimulatorHandle({self.url})"


def start_simulator(host: str = "127.0.0.1", port: int = 0,
                    state: SimulatorState | None = None) -> SimulatorHandle:
    """Starts the simulator on a background thread (port 0: any free port) and returns its handle."""
    server = SimulatorHTTPServer((host, port), state or SimulatorState())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name=f"simulator-{server.server_address[1]}", daemon=True)
    thread.start()
    return SimulatorHandle(server, thread)
