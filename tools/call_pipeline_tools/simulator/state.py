"""The simulator's shared state: what both fake APIs answer from and what the control plane sets.

``SimulatorState`` holds the loaded job groups and their jobs (each with a planned outcome that
``advance`` plays out), the queue of injected faults, the per-API latency, the OutboundBot QPS cap
and the counters ``stats`` reports. One re-entrant lock guards all of it. The API modules
(``outboundbot``, ``dashscope``) read the job data under that lock and count their requests through
the methods in the class's last section; everything else changes the state only through the
methods above it.

A fault dict (``inject_fault``; every key optional)::

    {"action": "ListJobs",     # an OutboundBot action; "*" = any OutboundBot action; "dashscope" =
                               # any DashScope call; "Generation" | "Application" | "ChatCompletions"
     "status": 400, "code": "Throttling.User", "message": "...",   # defaults by status (see
                               # wire.DEFAULT_CODES; DashScope's own table comes first for its calls)
     "times": 1,               # how many matching requests get it; null = every one until cleared
     "headers": {"x-acs-retry-after": "200"},
     "latency_ms": 0,          # extra delay; a fault with ONLY latency delays the normal answer
     "raw_body": "<html>bad gateway</html>",   # a non-JSON body (status defaults to 502)
     "success_false": false,   # OutboundBot: HTTP 200 with Success:false, Code, HttpStatusCode=status|400
     "llm_content": "...",     # DashScope: HTTP 200 whose answer content is this text
     "error_200": false,       # DashScope: HTTP 200 carrying {"code", "message", "request_id"} and
                               # no output (code defaults to InternalError)
     "job_ids": [...],         # OutboundBot: only requests that name one of these jobs (JobId, JobId.N,
                               # or the TaskId of one of their tasks)
     "job_group_id": "...",    # OutboundBot: only requests for this JobGroupId
     "page_number": 2,         # ListJobsByGroup: only requests for this page
     "match_text": "..."}      # DashScope: only requests whose body contains this text

The QPS cap counts OutboundBot requests per wall-clock second (``int(time.time())``); requests past
the cap in that second get ``400 Throttling.User``. Control-plane and recording requests are not
counted and never faulted.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from call_pipeline_tools.simulator import scenarios

MAX_LLM_REQUESTS_KEPT = 10_000


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
    error_200: bool = False
    job_ids: list[str] | None = None
    job_group_id: str | None = None
    page_number: int | None = None
    match_text: str | None = None
    id: int = 0
    hits: int = 0

    @property
    def latency_only(self) -> bool:
        return (self.status is None and self.code is None and self.raw_body is None
                and not self.success_false and self.llm_content is None and not self.error_200)


def tasks_of(job: dict) -> list[dict]:
    """The job's task dicts (a scenario may leave ``Tasks`` out or put junk in it)."""
    tasks = job.get("Tasks")
    return [t for t in tasks if isinstance(t, dict)] if isinstance(tasks, list) else []


def last_task(job: dict) -> dict | None:
    """The job's latest attempt: by ActualTime, then PlanedTime, then position (``Tasks`` may list
    them in any order, as the real API may)."""
    tasks = tasks_of(job)

    def when(item: tuple[int, dict]) -> tuple:
        index, task = item
        return tuple(t if isinstance(t, (int, float)) and not isinstance(t, bool) else 0
                     for t in (task.get("ActualTime"), task.get("PlanedTime"))) + (index,)

    return max(enumerate(tasks), key=when)[1] if tasks else None


class SimulatorState:
    """Everything the simulator knows; thread-safe (one re-entrant lock guards all of it).

    ``groups`` (JobGroupId → the group's own fields), ``group_jobs`` (JobGroupId → its JobIds in
    order), ``jobs`` (JobId → the job as OutboundBot shows it) and ``task_to_job`` are the live data:
    the API modules read them holding ``lock``, and only this class's methods change them.
    """

    def __init__(self, *, seed: int = 0) -> None:
        self._expired_urls_to_give = 0
        self._expired_url_given_to: set[str] = set()
        self.seed = seed
        self.lock = threading.RLock()
        self.groups: dict[str, dict] = {}
        self.group_jobs: dict[str, list[str]] = {}
        self.jobs: dict[str, dict] = {}
        self.task_to_job: dict[str, str] = {}
        self._plans: dict[str, dict] = {}
        self._recording_formats: dict[str, str] = {}  # JobId -> "mp3" (the default is "wav")
        # JobId -> {"after": seconds, "due": epoch s or None, "held": the transcript kept back}
        self._late_transcripts: dict[str, dict] = {}
        self._faults: list[Fault] = []
        self._fault_seq = 0
        self.outboundbot_latency_ms = 0.0
        self.dashscope_latency_ms = 0.0
        self.qps_cap: int | None = None
        # Jobs deleted from the cloud: ListJobs and DescribeJob no longer return them.
        self.jobs_gone: set[str] = set()
        # (cap, from page): ListJobsByGroup answers pages of at most `cap` jobs, as a cloud that
        # caps PageSize does, from that page number on (1: every page; more: a cloud whose answers
        # change size midway). See set_page_size_cap.
        self.page_size_cap: tuple[int, int] | None = None
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
        with self.lock:
            self._check_new_jobs(jobs, replacing=set(self.group_jobs.get(gid, [])))
            for job_id in self.group_jobs.pop(gid, []):
                self._forget_job(job_id)
            group.setdefault("JobGroupName", gid)
            group.setdefault("CreationTime", scenarios.DEFAULT_BASE_TIME_MS - 3_600_000)
            self.groups[gid] = group
            self.group_jobs[gid] = []
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
        with self.lock:
            if job_group_id not in self.groups:
                raise KeyError(f"unknown job group {job_group_id!r}")
            return self._add_jobs_locked(job_group_id, copy.deepcopy(jobs))

    def _check_new_jobs(self, jobs: list[dict], replacing: set[str] = frozenset()) -> None:
        seen: set[str] = set()
        for job in jobs:
            job_id = str(job.get("JobId") or "") if isinstance(job, dict) else ""
            if not job_id:
                raise ValueError("every job must be a dict with a JobId")
            if job_id in seen or (job_id in self.jobs and job_id not in replacing):
                raise ValueError(f"duplicate JobId {job_id!r}")
            seen.add(job_id)

    def _add_jobs_locked(self, gid: str, jobs: list[dict]) -> int:
        self._check_new_jobs(jobs, replacing=set())
        for job in jobs:
            meta = job.pop("_sim", None) or {}
            job.setdefault("JobGroupId", gid)
            job_id = str(job["JobId"])
            self.jobs[job_id] = job
            self.group_jobs[gid].append(job_id)
            if meta.get("outcome"):
                self._plans[job_id] = meta["outcome"]
            if meta.get("recording_format"):
                self._recording_formats[job_id] = str(meta["recording_format"])
            if meta.get("transcript_after_s") is not None:
                self._late_transcripts[job_id] = {"after": float(meta["transcript_after_s"]), "due": None,
                                                  "held": None}
                self._hold_transcript_locked(job)
            self._index_tasks(job)
        return len(jobs)

    def _forget_job(self, job_id: str) -> None:
        job = self.jobs.pop(job_id, None)
        self._plans.pop(job_id, None)
        self._recording_formats.pop(job_id, None)
        self._late_transcripts.pop(job_id, None)
        if job:
            for t in tasks_of(job):
                self.task_to_job.pop(str(t.get("TaskId")), None)

    def _index_tasks(self, job: dict) -> None:
        for t in tasks_of(job):
            if t.get("TaskId"):
                self.task_to_job[str(t["TaskId"])] = str(job["JobId"])

    def recording_format(self, task_id: str) -> str:
        """The file format of a call attempt's recording: "wav", or its job's ``recording:mp3``."""
        with self.lock:
            return self._recording_formats.get(self.task_to_job.get(task_id, ""), "wav")

    def _hold_transcript_locked(self, job: dict, now: float | None = None) -> None:
        """A job with a late transcript that has just turned Succeeded: its latest attempt ends
        now and shows no Conversation until its delay has passed."""
        late = self._late_transcripts.get(str(job.get("JobId")))
        if late is None or late["due"] is not None or job.get("Status") != "Succeeded":
            return
        attempt = last_task(job)
        if attempt is None:
            return
        now = time.time() if now is None else now
        duration = attempt.get("Duration") if isinstance(attempt.get("Duration"), int) else 0
        if isinstance(attempt.get("ActualTime"), int):
            shift = int(now * 1000) - duration * 1000 - attempt["ActualTime"]
            for key in ("PlanedTime", "ActualTime", "EndTime"):
                if isinstance(attempt.get(key), int):
                    attempt[key] += shift
            for entry in attempt.get("Conversation") or []:
                if isinstance(entry, dict) and isinstance(entry.get("Timestamp"), int):
                    entry["Timestamp"] += shift
        late["held"], attempt["Conversation"] = attempt.get("Conversation"), []
        late["due"] = now + late["after"]

    def release_late_transcripts(self, job_ids: list[str] | None = None, *, now: float | None = None) -> int:
        """Puts back the held transcripts whose delay has passed (with `job_ids`: those jobs' at
        once, whatever their delay); returns how many. The API modules call it before answering."""
        with self.lock:
            now = time.time() if now is None else now
            released = 0
            for job_id, late in list(self._late_transcripts.items()):
                if late["due"] is None or (job_ids is None and late["due"] > now):
                    continue
                if job_ids is not None and job_id not in job_ids:
                    continue
                attempt = last_task(self.jobs[job_id])
                if attempt is not None:
                    attempt["Conversation"] = late["held"]
                del self._late_transcripts[job_id]
                released += 1
            return released

    def get_job(self, job_id: str) -> dict | None:
        with self.lock:
            job = self.jobs.get(job_id)
            return copy.deepcopy(job) if job is not None else None

    def jobs_of_group(self, job_group_id: str) -> list[dict]:
        with self.lock:
            return [copy.deepcopy(self.jobs[j]) for j in self.group_jobs.get(job_group_id, [])]

    def job_group_ids(self) -> list[str]:
        with self.lock:
            return list(self.groups)

    def advance(self, job_group_id: str, steps: int = 1, job_ids: list[str] | None = None) -> dict:
        """Moves the group's jobs on by ``steps``: Drafted → Scheduling → Executing → final status.

        The final status, tasks and transcript come from the job's planned outcome (built by
        ``scenarios``), or a deterministic default one. Terminal and Paused jobs do not move.
        Returns ``{"moved": n, "statuses": {status: count}}`` after the last step.
        """
        moved = 0
        with self.lock:
            if job_group_id not in self.groups:
                raise KeyError(f"unknown job group {job_group_id!r}")
            wanted = set(job_ids) if job_ids else None
            for _ in range(max(0, int(steps))):
                for job_id in self.group_jobs[job_group_id]:
                    if wanted is None or job_id in wanted:
                        moved += self._step_job(self.jobs[job_id])
            statuses = Counter(str(self.jobs[j].get("Status")) for j in self.group_jobs[job_group_id])
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
            prior = [t for t in tasks_of(job) if t.get("Status") != "Executing"]
            job["Tasks"] = prior + ([in_flight] if in_flight else [])
            job["Status"] = "Executing"
        elif status == "Executing":
            plan = self._plan(job)
            job.update(Status=plan["Status"], FailureReason=plan.get("FailureReason", ""),
                       Tasks=copy.deepcopy(plan.get("Tasks", [])),
                       Summary=copy.deepcopy(plan.get("Summary", [])))
            self._hold_transcript_locked(job)
        else:
            return 0
        self._index_tasks(job)
        return 1

    # The job group statuses of the SDK's ListJobGroups/DescribeJobGroup models.
    JOB_GROUP_STATUSES = ("Draft", "Scheduling", "Executing", "Completed", "Paused", "Failed", "Cancelled",
                          "Initializing")

    def set_job_group_status(self, job_group_id: str, status: str | None) -> str:
        """Pins the group's Status (a campaign paused, or left in Draft, in the console); None
        unpins it, so that it follows its jobs again. Returns the status the API now shows."""
        if status is not None and status not in self.JOB_GROUP_STATUSES:
            raise ValueError(f"job group status must be one of {', '.join(self.JOB_GROUP_STATUSES)}, got {status!r}")
        with self.lock:
            if job_group_id not in self.groups:
                raise KeyError(f"unknown job group {job_group_id!r}")
            if status is None:
                self.groups[job_group_id].pop("Status", None)
            else:
                self.groups[job_group_id]["Status"] = status
            return status or ""

    def set_job_status(self, job_id: str, status: str, *, failure_reason: str | None = None,
                       tasks: list[dict] | None = None, conversation: Any = None) -> dict:
        """Sets a job's Status (and optionally FailureReason, Tasks, or the last task's Conversation).

        Moving a Scheduling/Executing job to the status of its planned outcome without ``tasks``
        applies the outcome's tasks too, so the job looks like a finished call.
        """
        with self.lock:
            job = self.jobs.get(job_id)
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
            self._hold_transcript_locked(job)
            if conversation is not None:
                last = last_task(job)
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
        with self.lock:
            self._fault_seq += 1
            f.id = self._fault_seq
            self._faults.append(f)
            return asdict(f)

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    @property
    def faults(self) -> list[dict]:
        with self.lock:
            return [asdict(f) for f in self._faults]

    def set_latency(self, outboundbot_ms: float | None = None, dashscope_ms: float | None = None) -> None:
        """Per-API delay before every answer (None leaves a value unchanged)."""
        with self.lock:
            if outboundbot_ms is not None:
                self.outboundbot_latency_ms = float(outboundbot_ms)
            if dashscope_ms is not None:
                self.dashscope_latency_ms = float(dashscope_ms)

    def expire_next_recording_urls(self, count: int) -> None:
        """The next `count` DownloadRecording answers carry a SignatureUrl that has expired, each
        for a task that had none: a URL asked for again is fresh, as the cloud signs it anew (and
        the `count` do not depend on which of concurrent requests arrives first)."""
        with self.lock:
            self._expired_urls_to_give = int(count)

    def set_qps_cap(self, cap: int | None) -> None:
        with self.lock:
            self.qps_cap = None if cap is None else int(cap)

    def set_page_size_cap(self, cap: int | None, from_page: int = 1) -> None:
        """ListJobsByGroup serves at most `cap` jobs a page, and echoes that PageSize (pages are
        cut at the capped size), for pages numbered `from_page` and after; None: no cap."""
        with self.lock:
            self.page_size_cap = None if cap is None else (max(1, int(cap)), max(1, int(from_page)))

    def capped_page_size(self, page_number: int, page_size: int) -> int:
        with self.lock:
            if self.page_size_cap is None or page_number < self.page_size_cap[1]:
                return page_size
            return min(page_size, self.page_size_cap[0])

    # -- stats ---------------------------------------------------------------------------------

    def _reset_stats_locked(self) -> None:
        self._stats: dict[str, Any] = {"throttled": 0, "faults_injected": 0, "recording_downloads": 0,
                                       "dashscope_requests": 0, "max_llm_in_flight": 0,
                                       "max_outboundbot_in_flight": 0}
        self._action_counts: Counter[str] = Counter()
        # Job ids named by ListJobs requests, in all (a run asks only about jobs not terminal yet)
        self._list_jobs_ids = 0
        self._ds_counts: Counter[str] = Counter()
        self._per_second: Counter[int] = Counter()
        self._arrivals: list[float] = []
        self._llm_in_flight = 0
        self._ob_in_flight = 0
        self._llm_requests: list[dict] = []
        # DownloadRecording calls per TaskId, to tell a repeated call
        self._downloads_by_task: Counter[str] = Counter()

    def set_jobs_gone(self, job_ids: list[str]) -> list[str]:
        """Jobs that ListJobs (and DescribeJob) no longer return, as for a job deleted in the
        cloud; an empty list brings every job back."""
        with self.lock:
            self.jobs_gone = {str(j) for j in job_ids}
            return sorted(self.jobs_gone)

    def reset_stats(self) -> None:
        with self.lock:
            llm_in_flight, ob_in_flight = self._llm_in_flight, self._ob_in_flight
            self._reset_stats_locked()
            self._llm_in_flight, self._ob_in_flight = llm_in_flight, ob_in_flight

    def reset(self) -> None:
        """Forgets all groups, faults, latency and the QPS cap, and resets the stats."""
        with self.lock:
            self.groups.clear()
            self.group_jobs.clear()
            self.jobs.clear()
            self._plans.clear()
            self._recording_formats.clear()
            self._late_transcripts.clear()
            self.task_to_job.clear()
            self._faults.clear()
            self.outboundbot_latency_ms = self.dashscope_latency_ms = 0.0
            self.qps_cap = None
            self.jobs_gone.clear()
            self.page_size_cap = None
            self._expired_urls_to_give = 0
            self._expired_url_given_to.clear()
            self.reset_stats()

    @property
    def llm_requests(self) -> list[dict]:
        """The DashScope request bodies received so far (parsed JSON), oldest first (the last 10,000)."""
        with self.lock:
            return copy.deepcopy(self._llm_requests)

    def stats(self) -> dict:
        """``requests`` per OutboundBot action, the per-second arrival histogram and its maximum
        (``max_requests_per_second``, wall-clock seconds; ``max_requests_in_any_1s`` is the sliding
        window maximum), ``throttled`` (QPS-cap rejections), DashScope counts and in-flight maxima."""
        with self.lock:
            arrivals = sorted(self._arrivals)  # stamped on arrival, appended in the lock's order
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
                "list_jobs_job_ids": self._list_jobs_ids,

                "llm_in_flight": self._llm_in_flight,
                "max_llm_in_flight": self._stats["max_llm_in_flight"],
                "outboundbot_in_flight": self._ob_in_flight,
                "max_outboundbot_in_flight": self._stats["max_outboundbot_in_flight"],
                "qps_cap": self.qps_cap,
                "latency": {"outboundbot_ms": self.outboundbot_latency_ms,
                            "dashscope_ms": self.dashscope_latency_ms},
            }

    # -- bookkeeping for the API modules -------------------------------------------------------

    def take_fault(self, kind: str, action: str, *, job_ids: set[str] | None = None,
                   job_group_id: str | None = None, page_number: int | None = None,
                   text: str | None = None) -> Fault | None:
        """The first queued fault matching this request (kind: "outboundbot" or "dashscope"), used up
        once; a copy, so the caller sees it as it was when taken."""
        with self.lock:
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

    def count_outboundbot_request(self, action: str, now: float, arrived_monotonic: float | None = None) -> bool:
        """Counts one OutboundBot request arriving at ``now`` (epoch seconds; ``arrived_monotonic``
        the same moment by the monotonic clock, now if not given); True if the QPS cap throttles it."""
        with self.lock:
            self._action_counts[action] += 1
            second = int(now)
            self._per_second[second] += 1
            self._arrivals.append(time.monotonic() if arrived_monotonic is None else arrived_monotonic)
            throttled = self.qps_cap is not None and self._per_second[second] > self.qps_cap
            if throttled:
                self._stats["throttled"] += 1
            return throttled

    def count_list_jobs_ids(self, count: int) -> None:
        with self.lock:
            self._list_jobs_ids += count

    def count_download_recording_call(self, task_id: str) -> None:
        """Counts a DownloadRecording request for the task (``stats`` tells repeated ones)."""
        with self.lock:
            self._downloads_by_task[task_id] += 1

    def take_expired_recording_url(self, task_id: str) -> bool:
        """True if this DownloadRecording answer for `task_id` is to carry an expired URL
        (``expire_next_recording_urls``)."""
        with self.lock:
            if self._expired_urls_to_give > 0 and task_id not in self._expired_url_given_to:
                self._expired_urls_to_give -= 1
                self._expired_url_given_to.add(task_id)
                return True
            return False

    def count_recording_fetch(self, task_id: str) -> bool:
        """Counts a fetch of a task's recording file (``recording_downloads``); False, uncounted, for
        an unknown task."""
        with self.lock:
            known = task_id in self.task_to_job
            if known:
                self._stats["recording_downloads"] += 1
            return known

    def outboundbot_call_started(self) -> None:
        with self.lock:
            self._ob_in_flight += 1
            self._stats["max_outboundbot_in_flight"] = max(self._stats["max_outboundbot_in_flight"],
                                                           self._ob_in_flight)

    def outboundbot_call_finished(self) -> None:
        with self.lock:
            self._ob_in_flight -= 1

    def dashscope_call_started(self, endpoint: str) -> None:
        with self.lock:
            self._stats["dashscope_requests"] += 1
            self._ds_counts[endpoint] += 1
            self._llm_in_flight += 1
            self._stats["max_llm_in_flight"] = max(self._stats["max_llm_in_flight"], self._llm_in_flight)

    def dashscope_call_finished(self) -> None:
        with self.lock:
            self._llm_in_flight -= 1

    def record_llm_request(self, body: dict) -> None:
        with self.lock:
            self._llm_requests.append(copy.deepcopy(body))
            if len(self._llm_requests) > MAX_LLM_REQUESTS_KEPT:  # a long-running demo must not grow forever
                del self._llm_requests[: len(self._llm_requests) - MAX_LLM_REQUESTS_KEPT]
