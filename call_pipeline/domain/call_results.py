"""Step 3: turn ListJobs answers into the values written to a lead (contract: "Call results")."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from call_pipeline.domain._values import clean_text

SUCCEEDED, FAILED, CANCELLED = "Succeeded", "Failed", "Cancelled"
TERMINAL_JOB_STATUSES = frozenset({SUCCEEDED, FAILED, CANCELLED})
NON_TERMINAL_JOB_STATUSES = frozenset({"Scheduling", "Executing", "Paused", "Drafted"})

# Epoch values below this are seconds: 1e11 ms is 1973, 1e11 s is the year 5138.
_SECONDS_BELOW = 1e11


def _zone(tz: str | ZoneInfo) -> ZoneInfo:
    return tz if isinstance(tz, ZoneInfo) else ZoneInfo(tz)


def _epoch_number(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        number = float(value)
    else:
        text = clean_text(value)
        if text is None:
            return None
        try:
            number = float(text)
        except ValueError:
            return None
    return number if math.isfinite(number) else None


def epoch_to_crm_datetime(value: object, tz: str | ZoneInfo) -> datetime | None:
    """An API epoch time (ms, or s by magnitude) as a naive datetime in the CRM's zone.

    Truncated to whole seconds: MySQL DATETIME rounds fractions while SQLite keeps them, and the
    two back ends should store the same value.
    """
    number = _epoch_number(value)
    if number is None or number <= 0:
        return None
    seconds = number if number < _SECONDS_BELOW else number / 1000.0
    try:
        moment = datetime.fromtimestamp(int(seconds), tz=_zone(tz))
    except (OverflowError, OSError, ValueError):
        return None
    return moment.replace(tzinfo=None)


def epoch_seconds(value: object) -> float | None:
    """An API epoch time (ms, or s by magnitude) as epoch seconds; None when absent, zero or not
    a positive number."""
    number = _epoch_number(value)
    if number is None or number <= 0:
        return None
    return number if number < _SECONDS_BELOW else number / 1000.0


def latest_attempt(tasks: object) -> tuple[int | None, list[str]]:
    """The index in `tasks` of the latest call attempt: the latest `ActualTime`, then the latest
    `PlanedTime`, then the later position (the API promises no order of `Tasks`). An attempt
    without an `ActualTime` (absent, zero or not a time) counts as earlier than every attempt
    with one; times in seconds and in milliseconds compare as the same moments. Entries that are
    not objects are left out, with a problem. None when there is no attempt."""
    problems: list[str] = []
    if not isinstance(tasks, list) or not tasks:
        return None, ["job has no call attempts"]
    best: tuple | None = None
    best_index: int | None = None
    for index, task in enumerate(tasks):
        if not isinstance(task, dict):
            problems.append(f"call attempt #{index + 1} is a {type(task).__name__}, not an object; ignored")
            continue
        actual, planed = epoch_seconds(task.get("ActualTime")), epoch_seconds(task.get("PlanedTime"))
        key = (actual is not None, actual or 0.0, planed is not None, planed or 0.0, index)
        if best is None or key > best:
            best, best_index = key, index
    if best_index is None:
        problems.append("job has no call attempt that is an object")
    return best_index, problems


# Longer than any call: a Duration beyond it is not a call's length in seconds.
_MAX_CALL_SECONDS = 6 * 3600


def call_ended_at(task: dict, tz: str | ZoneInfo) -> datetime | None:
    """When the call attempt ended, naive in the CRM's zone: its `ActualTime` plus its `Duration`
    (seconds) when both are there, else its `ActualTime`, else its `PlanedTime`. ListJobs' tasks
    carry no `EndTime` (DescribeJob's do)."""
    start = epoch_to_crm_datetime(task.get("ActualTime"), tz)
    if start is None:
        return epoch_to_crm_datetime(task.get("PlanedTime"), tz)
    duration = _epoch_number(task.get("Duration"))
    if duration is not None and 0 < duration <= _MAX_CALL_SECONDS:
        return start + timedelta(seconds=int(duration))
    return start


@dataclass(frozen=True)
class CallResult:
    job_id: str
    call_status: str | None
    call_conversation: str | None
    planed_time: datetime | None
    call_task_id: str | None
    calling_number: str | None
    problems: tuple[str, ...] = ()
    # When the attempt used ended (see call_ended_at): for a transcript that comes late.
    call_ended: datetime | None = None


@dataclass
class ListJobsParse:
    results: list[CallResult] = field(default_factory=list)
    missing_job_ids: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _conversation(raw: object, problems: list[str]) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        problems.append(f"conversation is a {type(raw).__name__}, not a list; not stored")
        return None
    if not raw:
        return None
    # default=str: a stray non-JSON value inside an entry must not lose the whole transcript.
    return json.dumps(raw, ensure_ascii=False, default=str)


def parse_list_jobs_job(job: dict, tz: str | ZoneInfo) -> CallResult:
    """One ListJobs job → the lead's new values; raises ValueError only when the job has no JobId."""
    if not isinstance(job, dict):
        raise ValueError(f"job is a {type(job).__name__}, not an object")
    job_id = clean_text(job.get("JobId"))
    if job_id is None:
        raise ValueError("job has no JobId, so it cannot be tied to a lead")
    problems: list[str] = []

    tasks = job.get("Tasks")
    index, attempt_problems = latest_attempt(tasks)
    problems.extend(attempt_problems)
    last: dict = tasks[index] if index is not None else {}

    status = clean_text(job.get("Status"))
    if status is None:
        status = clean_text(last.get("Status"))
        if status is not None:
            problems.append(f"job has no Status; used the latest call attempt's status {status!r}")
    if status is None:
        problems.append("job has no status")
    elif status not in TERMINAL_JOB_STATUSES and status not in NON_TERMINAL_JOB_STATUSES:
        problems.append(f"unknown job status {status!r}; stored as is and queried again later")

    raw_time = last.get("PlanedTime")
    planed_time = epoch_to_crm_datetime(raw_time, tz)
    if planed_time is None and clean_text(raw_time) not in (None, "0"):
        problems.append(f"PlanedTime {raw_time!r} is not an epoch time; not stored")

    return CallResult(
        job_id=job_id,
        call_status=status,
        call_conversation=_conversation(last.get("Conversation"), problems),
        planed_time=planed_time,
        call_task_id=clean_text(last.get("TaskId")),
        calling_number=clean_text(last.get("CallingNumber")),
        problems=tuple(problems),
        call_ended=call_ended_at(last, tz) if last else None,
    )


def parse_list_jobs_body(body: dict, requested_job_ids: list[str], tz: str | ZoneInfo) -> ListJobsParse:
    """A ListJobs body → one result per requested job it contains; the rest are reported missing."""
    parsed = ListJobsParse()
    requested = list(dict.fromkeys(j for j in map(clean_text, requested_job_ids) if j is not None))
    jobs = body.get("Jobs") if isinstance(body, dict) else None
    if jobs is None:
        parsed.problems.append("response has no Jobs")
        jobs = []
    elif not isinstance(jobs, list):
        parsed.problems.append(f"response Jobs is a {type(jobs).__name__}, not a list")
        jobs = []

    wanted = set(requested)
    found: set[str] = set()
    for position, job in enumerate(jobs, start=1):
        try:
            result = parse_list_jobs_job(job, tz)
        except ValueError as exc:
            parsed.problems.append(f"job #{position} in the response: {exc}")
            continue
        if result.job_id not in wanted:
            parsed.problems.append(f"job {result.job_id} was returned but not requested; ignored")
            continue
        if result.job_id in found:
            parsed.problems.append(f"job {result.job_id} was returned twice; the first is used")
            continue
        found.add(result.job_id)
        parsed.results.append(result)
    parsed.missing_job_ids = [j for j in requested if j not in found]
    return parsed
