"""The simulated OutboundBot API (2019-12-26, RPC style), answering from a ``SimulatorState``.

``handle`` serves one request end to end (stats, QPS cap, faults, latency, then the answer) for the
actions in ``ACTIONS``: ListJobsByGroup, ListJobs, DescribeJob, DescribeJobGroup, DownloadRecording,
QueryJobsWithResult and ListJobGroups. Their parameters arrive as query strings, the way the
alibabacloud_outboundbot20191226 SDK sends them. ``recording`` serves the WAV file behind a
DownloadRecording SignatureUrl.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import re
import time
import uuid
import wave
from collections import Counter
from collections.abc import Callable
from typing import Any

from call_pipeline_tools.simulator import scenarios
from call_pipeline_tools.simulator.state import Fault, SimulatorState, last_task, tasks_of
from call_pipeline_tools.simulator.wire import DEFAULT_CODES, JSON_CT, KNOWN_MESSAGES, SimResponse, dumps

OB_HOST_ID = "outboundbot.cn-shanghai.aliyuncs.com"
TERMINAL = set(scenarios.TERMINAL_JOB_STATUSES)

_JOB_STATUS_NAMES = {"Scheduling": "调度中", "Executing": "执行中", "Succeeded": "已完成-已触达",
                     "Paused": "已暂停", "Failed": "已完成-未触达", "Cancelled": "已取消", "Drafted": "草稿"}
_END_REASONS = {"1": "FINISHED", "2": "CHATBOT_HANGUP_AFTER_NOANSWER", "3": "CHATBOT_HANGUP_AFTER_SILENCE",
                "4": "CLIENT_HANGUP_AFTER_NOANSWER", "5": "CLIENT_HANGUP", "6": "TRANSFER_BY_INTENT",
                "7": "TRANSFER_AFTER_NOANSWER", "8": "INO_INTERACTION", "9": "ERROR"}


class ApiError(Exception):
    """A request the real service would refuse; ``handle`` turns it into an error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _request_id() -> str:
    return str(uuid.uuid4()).upper()


def error_body(code: str, message: str, request_id: str | None = None) -> bytes:
    """An OutboundBot (POP gateway) error body."""
    return dumps({"RequestId": request_id or _request_id(), "HostId": OB_HOST_ID, "Code": code,
                  "Message": message,
                  "Recommend": f"https://next.api.aliyun.com/troubleshoot?q={code}&product=OutboundBot"})


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


def _first_contact(job: dict) -> dict:
    contacts = job.get("Contacts")
    if isinstance(contacts, list) and contacts and isinstance(contacts[0], dict):
        return contacts[0]
    return {}


# ---------------------------------------------------------------------------------------------
# One request


def handle(state: SimulatorState, action: str, params: dict[str, str], base_url: str,
           arrived: tuple[float, float] | None = None) -> SimResponse:
    """One OutboundBot request, end to end: stats, QPS cap, faults, latency, then the answer.

    ``base_url`` is where the client reached the simulator (DownloadRecording's URLs point there);
    ``arrived`` when the request arrived (``time.time()``, ``time.monotonic()``), now if not given.
    """
    now, arrived_monotonic = arrived or (time.time(), time.monotonic())
    with state.lock:
        throttled = state.count_outboundbot_request(action, now, arrived_monotonic)
        fault = None
        if not throttled:
            job_ids, group_id = _request_targets(state, params)
            if action == "DownloadRecording" and params.get("TaskId"):
                state.count_download_recording_call(params["TaskId"])
            if action == "ListJobs":
                state.count_list_jobs_ids(len(_indexed_list(params, "JobId")))
            fault = state.take_fault("outboundbot", action, job_ids=job_ids, job_group_id=group_id,
                                     page_number=_int(params, "PageNumber") if action == "ListJobsByGroup"
                                     else None)
        delay = state.outboundbot_latency_ms + (fault.latency_ms if fault else 0)
        state.outboundbot_call_started()
    try:
        if delay > 0:
            time.sleep(delay / 1000)
        if throttled:
            return SimResponse(400, error_body("Throttling.User", KNOWN_MESSAGES["Throttling.User"]))
        if fault is not None and not fault.latency_only:
            return _fault_response(fault)
        return _answer(state, action, params, base_url)
    finally:
        state.outboundbot_call_finished()


def _request_targets(state: SimulatorState, params: dict[str, str]) -> tuple[set[str], str | None]:
    """The jobs (and their named tasks) and the job group a request names, for fault matching."""
    ids = set(_indexed_list(params, "JobId"))
    if params.get("JobId"):
        ids.add(params["JobId"])
    task_id = params.get("TaskId")
    if task_id:
        ids.add(task_id)
        if task_id in state.task_to_job:
            ids.add(state.task_to_job[task_id])
    return ids, params.get("JobGroupId")


def _fault_response(f: Fault) -> SimResponse:
    if f.raw_body is not None:
        return SimResponse(f.status or 502, f.raw_body.encode("utf-8"), "text/html;charset=utf-8",
                           dict(f.headers))
    if f.success_false:
        status = f.status if f.status and f.status != 200 else 400
        code, message = DEFAULT_CODES.get(status, ("InternalError", "Error"))
        code = f.code or code
        body = {"RequestId": _request_id(), "Success": False, "Code": code,
                "Message": f.message or KNOWN_MESSAGES.get(code, message), "HttpStatusCode": status}
        return SimResponse(200, dumps(body), JSON_CT, dict(f.headers))
    status = f.status or 400
    code, message = DEFAULT_CODES.get(status, ("InternalError", "Error"))
    code = f.code or code
    message = f.message or KNOWN_MESSAGES.get(code, message)
    return SimResponse(status, error_body(code, message), JSON_CT, dict(f.headers))


def _answer(state: SimulatorState, action: str, params: dict[str, str], base_url: str) -> SimResponse:
    handler = ACTIONS.get(action)
    if handler is None:
        return SimResponse(404, error_body("InvalidAction.NotFound",
                                           f"Specified api is not found, please check your url and "
                                           f"method. Action: {action}"))
    request_id = _request_id()
    try:
        with state.lock:
            state.release_late_transcripts()
            payload = handler(state, params, base_url)
            body = {"RequestId": request_id, "Success": True, "Code": "OK", "Message": "",
                    "HttpStatusCode": 200, **payload}
            # Serialized under the lock: advance() may be rewriting these very job dicts.
            data = dumps(body)
    except ApiError as e:
        return SimResponse(e.status, error_body(e.code, e.message, request_id))
    return SimResponse(200, data, JSON_CT, {"x-acs-request-id": request_id})


# ---------------------------------------------------------------------------------------------
# The actions: each returns its answer's fields (beside RequestId, Success, Code...), called with
# the state's lock held.


def _group_or_error(state: SimulatorState, params: dict[str, str]) -> str:
    gid = params.get("JobGroupId")
    if not gid:
        raise ApiError(400, "MissingJobGroupId", "JobGroupId is mandatory for this action.")
    if gid not in state.groups:
        raise ApiError(400, "InvalidParameter", f"The specified JobGroupId does not exist: {gid}")
    return gid


def _page(params: dict[str, str]) -> tuple[int, int]:
    number = _int(params, "PageNumber", 1) or 1
    size = _int(params, "PageSize", 10) or 10
    if number < 1 or size < 1:
        raise ApiError(400, "InvalidParameter", "PageNumber and PageSize must be positive.")
    return number, size


def _list_jobs_by_group(state: SimulatorState, params: dict[str, str], base_url: str) -> dict:
    gid = _group_or_error(state, params)
    number, size = _page(params)
    size = state.capped_page_size(number, size)
    status, reason = params.get("JobStatus"), params.get("JobFailureReason")
    jobs = [state.jobs[j] for j in state.group_jobs[gid]]
    if status:
        jobs = [j for j in jobs if j.get("Status") == status]
    if reason:
        jobs = [j for j in jobs if j.get("FailureReason") == reason]
    page = jobs[(number - 1) * size: number * size]
    return {"Jobs": {"TotalCount": len(jobs), "PageNumber": number, "PageSize": size,
                     "List": [{k: v for k, v in j.items() if k != "Tasks"} for j in page]}}


def _list_jobs(state: SimulatorState, params: dict[str, str], base_url: str) -> dict:
    ids = _indexed_list(params, "JobId")
    if not ids:
        raise ApiError(400, "MissingJobId", "JobId is mandatory for this action.")
    if len(ids) > 99:
        raise ApiError(400, "InvalidParameter",
                       f"A maximum of 99 job IDs can be specified; got {len(ids)}.")
    return {"Jobs": [state.jobs[j] for j in ids if j in state.jobs and j not in state.jobs_gone]}


def _describe_job(state: SimulatorState, params: dict[str, str], base_url: str) -> dict:
    job_id = params.get("JobId")
    if not job_id:
        raise ApiError(400, "MissingJobId", "JobId is mandatory for this action.")
    job = state.jobs.get(job_id) if job_id not in state.jobs_gone else None
    if job is None:
        raise ApiError(400, "InvalidParameter", f"The specified JobId does not exist: {job_id}")
    out = copy.deepcopy(job)
    out["InstanceId"] = params.get("InstanceId", "")
    last = last_task(out)
    if last is not None:
        out.setdefault("ActualTime", last.get("ActualTime"))
        out.setdefault("CalledNumber", last.get("CalledNumber"))
        out.setdefault("EndReason", last.get("EndReason", ""))
    for t in tasks_of(out):
        convo = t.get("Conversation")
        if isinstance(convo, list):
            for i, e in enumerate(convo):
                if isinstance(e, dict):
                    e.setdefault("SequenceId", str(i + 1))
                    e.setdefault("Action", "")
                    e.setdefault("ActionParams", "")
    return {"Job": out}


def _download_recording(state: SimulatorState, params: dict[str, str], base_url: str) -> dict:
    task_id = params.get("TaskId")
    if not task_id:
        raise ApiError(400, "MissingTaskId", "TaskId is mandatory for this action.")
    if task_id not in state.task_to_job:
        raise ApiError(400, "InvalidParameter", f"The specified TaskId does not exist: {task_id}")
    expires = int(time.time()) + 3600
    if state.take_expired_recording_url(task_id):  # a URL whose signature ran out before it was fetched
        expires = int(time.time()) - 60
    signature = hashlib.sha1(f"{task_id}:{expires}".encode()).hexdigest()[:28]
    extension = state.recording_format(task_id)
    url = f"{base_url}/__recordings/{task_id}.{extension}?Expires={expires}&Signature={signature}"
    slices = "[]" if not _bool(params, "NeedVoiceSliceRecording") else json.dumps([])
    return {"DownloadParams": {"FileName": f"{task_id}.{extension}", "SignatureUrl": url,
                               "EarlyMediaSignatureUrl": "", "VoiceSliceRecordingListJson": slices}}


def _progress(state: SimulatorState, gid: str) -> dict:
    jobs = [state.jobs[j] for j in state.group_jobs[gid]]
    counts = Counter(str(j.get("Status")) for j in jobs)
    not_answered = 0
    duration = 0
    for j in jobs:
        tasks = tasks_of(j)
        duration += sum(t.get("Duration") or 0 for t in tasks if isinstance(t.get("Duration"), int))
        if str(j.get("Status")) in TERMINAL and not any(
                str(t.get("Status", "")).startswith("Succeeded") for t in tasks):
            not_answered += 1
    completed = sum(counts[s] for s in TERMINAL)
    return {"TotalJobs": len(jobs), "TotalCompleted": completed, "Executing": counts["Executing"],
            "Scheduling": counts["Scheduling"], "Failed": counts["Failed"], "Paused": counts["Paused"],
            "Cancelled": counts["Cancelled"], "TotalNotAnswered": not_answered, "Duration": duration,
            "StartTime": state.groups[gid].get("CreationTime"), "Status": _group_status(state, gid, counts),
            "Briefs": [], "Categories": []}


def _group_status(state: SimulatorState, gid: str, counts: Counter[str] | None = None) -> str:
    pinned = state.groups[gid].get("Status")
    if pinned:
        return str(pinned)
    if counts is None:
        counts = Counter(str(state.jobs[j].get("Status")) for j in state.group_jobs[gid])
    total = sum(counts.values())
    done = sum(counts[s] for s in TERMINAL)
    if total and done == total:
        return "Completed"
    if counts["Executing"] or done:
        return "Executing"
    return "Scheduling"


def _strategy(state: SimulatorState, gid: str) -> dict:
    group = state.groups[gid]
    return {"StrategyId": group.get("StrategyId", ""), "StrategyName": "工作日白天外呼",
            "StartTime": group.get("CreationTime"),
            "EndTime": (group.get("CreationTime") or 0) + 7 * 86_400_000,
            "MaxAttemptsPerDay": 2, "MinAttemptInterval": 30, "RepeatBy": "Once", "RepeatDays": [],
            "Repeatable": False, "RoutingStrategy": "LocalFirst", "Type": "Repeatable",
            "IsTemplate": False,
            "Customized": "", "FollowUpStrategy": "", "StrategyDescription": "",
            "WorkingTime": [{"BeginTime": "09:00:00", "EndTime": "12:00:00"},
                            {"BeginTime": "14:00:00", "EndTime": "20:00:00"}]}


def _describe_job_group(state: SimulatorState, params: dict[str, str], base_url: str) -> dict:
    gid = _group_or_error(state, params)
    group = state.groups[gid]
    return {"JobGroup": {
        "JobGroupId": gid, "JobGroupName": group.get("JobGroupName", gid),
        "JobGroupDescription": group.get("JobGroupDescription", ""), "Status": _group_status(state, gid),
        "CreationTime": group.get("CreationTime"), "ModifyTime": str(group.get("CreationTime")),
        "ScriptId": group.get("ScriptId", ""), "ScriptName": group.get("ScriptName", ""),
        "ScriptVersion": "1", "ScenarioId": group.get("ScenarioId", ""),
        "CallingNumbers": list(group.get("CallingNumbers", [])), "RecallCallingNumbers": [],
        "Priority": "Daily", "MinConcurrency": 0, "RingingDuration": 25,
        "Progress": _progress(state, gid), "Strategy": _strategy(state, gid)}}


def _list_job_groups(state: SimulatorState, params: dict[str, str], base_url: str) -> dict:
    number, size = _page(params)
    wanted = set(_str_list(params.get("JobGroupStatusFilter")))
    search = params.get("SearchText") or ""
    start, end = _int(params, "StartTime"), _int(params, "EndTime")
    rows = []
    for gid, group in state.groups.items():
        p = _progress(state, gid)
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


def _query_jobs_with_result(state: SimulatorState, params: dict[str, str], base_url: str) -> dict:
    gid = _group_or_error(state, params)
    number, size = _page(params)
    job_status = set(_str_list(params.get("JobStatusFilter")))
    task_status = set(_str_list(params.get("TaskStatusFilter")))
    reasons = set(_str_list(params.get("JobFailureReasonsFilter")))
    answered = _bool(params, "HasAnsweredFilter")
    rejected = _bool(params, "HasHangUpByRejectionFilter")
    reached_end = _bool(params, "HasReachedEndOfFlowFilter")
    t_from, t_to = _int(params, "StartActualTimeFilter"), _int(params, "EndActualTimeFilter")
    text = params.get("QueryText") or ""
    rows = []
    for job_id in state.group_jobs[gid]:
        row = _result_row(state.jobs[job_id])
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


def _result_row(job: dict) -> dict:
    status = str(job.get("Status"))
    row: dict[str, Any] = {"Id": job.get("JobId"), "Status": status,
                           "StatusName": _JOB_STATUS_NAMES.get(status, status),
                           "JobFailureReason": job.get("FailureReason", "")}
    last = last_task(job)
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
                    "Role": contact.get("Role", ""), "Round": len(tasks_of(job)),
                    "State": contact.get("State", "")},
        "Extras": [{"Key": s.get("SummaryName"), "Value": s.get("Content")} for s in summary
                   if isinstance(s, dict)],
        "TagHits": [], "DialExceptionCodes": []}
    return row


Action = Callable[[SimulatorState, dict[str, str], str], dict]
ACTIONS: dict[str, Action] = {
    "ListJobsByGroup": _list_jobs_by_group,
    "ListJobs": _list_jobs,
    "DescribeJob": _describe_job,
    "DescribeJobGroup": _describe_job_group,
    "DownloadRecording": _download_recording,
    "QueryJobsWithResult": _query_jobs_with_result,
    "ListJobGroups": _list_job_groups,
}


# ---------------------------------------------------------------------------------------------
# The recording file behind a DownloadRecording SignatureUrl


def recording(state: SimulatorState, task_id: str, query: dict[str, str]) -> SimResponse:
    """``GET /__recordings/<task_id>.wav`` (or ``.mp3``): the task's recording, in its job's format
    (``recording:mp3`` in the scenario), or an OSS-style XML error for an unknown task or an expired
    URL. Never throttled nor faulted."""
    if not state.count_recording_fetch(task_id):
        return SimResponse(404, b"<Error><Code>NoSuchKey</Code></Error>", "application/xml")
    expires = query.get("Expires")
    if expires and expires.isdigit() and int(expires) < time.time():
        return SimResponse(403, b"<Error><Code>AccessDenied</Code><Message>Request has expired."
                                b"</Message></Error>", "application/xml")
    if state.recording_format(task_id) == "mp3":
        return SimResponse(200, mp3_bytes(task_id), "audio/mpeg")
    return SimResponse(200, wav_bytes(task_id), "audio/wav")


def mp3_bytes(seed_text: str, frames: int = 8) -> bytes:
    """A short MP3 as the cloud may store a recording: an ID3v2 tag, then MPEG-1 Layer III frames
    (128 kbit/s, 44.1 kHz: 417 bytes each) whose payload depends on the task id."""
    tag = b"ID3\x04\x00\x00\x00\x00\x00\x00"
    header = b"\xff\xfb\x90\x64"
    payload = (hashlib.md5(seed_text.encode()).digest() * 27)[: 417 - len(header)]
    return tag + (header + payload) * frames


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
