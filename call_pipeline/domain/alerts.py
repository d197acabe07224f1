"""Failure alerts: what a failed run says, in the webhook formats of the chat tools the teams use.
Nothing secret and no full phone number leaves in one: the error text is scrubbed first."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime

from call_pipeline.domain.phones import mask_phone

ALERT_FORMATS = ("json", "dingtalk", "wecom", "feishu", "slack")
MAX_ERROR_CHARS = 800
# Mainland mobile numbers (11 digits from 1), with an optional +86/0086/86 and spaces or dashes.
_PHONE = re.compile(r"(?<!\d)(?:\+?86[\s-]?|0086[\s-]?)?1\d{2}[\s-]?\d{4}[\s-]?\d{4}(?!\d)")


@dataclass(frozen=True)
class Alert:
    task_id: str
    task_name: str
    run_id: str
    job: str
    step: str
    error: str
    run_url: str


@dataclass(frozen=True)
class HotLead:
    """A lead the AI marked interested, as the sales team's chat shows it (the phone masked)."""

    task_id: int
    task_name: str
    lead_id: int
    remark: str
    next_follow_time: str | None  # "YYYY-MM-DD HH:MM:SS", in the CRM's zone
    phone: str


def hot_lead(task_id: int, task_name: str, lead_id: int, remark: str | None, next_follow_time: datetime | None,
             phone: object) -> HotLead:
    """The post of one interested lead: the phone masked, and every phone number the model may
    have written into the remark masked too."""
    return HotLead(task_id, task_name, lead_id, scrub(remark or ""),
                   next_follow_time.strftime("%Y-%m-%d %H:%M:%S") if next_follow_time else None, mask_phone(phone))


def hot_lead_payload(lead: HotLead, fmt: str) -> dict:
    """The webhook body for `fmt` (json: the lead's fields as they are)."""
    if fmt == "json":
        return asdict(lead)
    title = f"call_pipeline: interested lead {lead.lead_id} in task {lead.task_id} ({lead.task_name})"
    lines = [f"phone: {lead.phone}", f"remark: {lead.remark}", f"next follow-up: {lead.next_follow_time or '—'}"]
    return _chat_payload(title, lines, fmt)


def _chat_payload(title: str, lines: list[str], fmt: str) -> dict:
    """The body a chat webhook of `fmt` takes: the title, then a line each."""
    if fmt == "dingtalk":
        return {"msgtype": "markdown", "markdown": {"title": title, "text": "\n\n".join([f"### {title}", *lines])}}
    if fmt == "wecom":
        return {"msgtype": "markdown", "markdown": {"content": "\n".join([f"**{title}**", *lines])}}
    if fmt == "feishu":
        return {"msg_type": "text", "content": {"text": "\n".join([title, *lines])}}
    if fmt == "slack":
        return {"text": "\n".join([f"*{title}*", *lines])}
    raise ValueError(f"CALL_PIPELINE_ALERT_FORMAT must be one of {', '.join(ALERT_FORMATS)}, got {fmt!r}")


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every secret replaced and every phone number masked, cut to a readable length."""
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = _PHONE.sub(lambda m: mask_phone(m.group(0)), text)
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def alert_payload(alert: Alert, fmt: str) -> dict:
    """The webhook body for `fmt` (json: the alert's fields as they are)."""
    if fmt == "json":
        return asdict(alert)
    title = f"call_pipeline: task {alert.task_id} ({alert.task_name}) failed"
    lines = [f"job: {alert.job}", f"step: {alert.step}", f"error: {alert.error}", f"run: {alert.run_url}"]
    return _chat_payload(title, lines, fmt)


@dataclass(frozen=True)
class StoppedGroupAlert:
    """A task whose job group has stood still (Paused, Draft, Initializing) for too long: nothing
    the pipeline does makes it call again, someone must resume or start it in the cloud."""
    task_id: str
    task_name: str
    job_group_id: str
    status: str
    stopped_since: str  # when the pipeline first saw it stopped (ISO 8601, UTC)
    stopped_hours: float
    task_url: str
    kind: str = "job_group_stopped"


def stopped_group_payload(alert: StoppedGroupAlert, fmt: str) -> dict:
    """The webhook body for `fmt` (json: the alert's fields as they are)."""
    if fmt == "json":
        return asdict(alert)
    title = (f"call_pipeline: task {alert.task_id} ({alert.task_name}): job group {alert.status} "
             f"for {alert.stopped_hours:g} h")
    lines = [f"job group: {alert.job_group_id}", f"status: {alert.status}",
             f"stopped since: {alert.stopped_since}", "the task stays at 2 until the group calls again",
             f"task: {alert.task_url}"]
    return _chat_payload(title, lines, fmt)
