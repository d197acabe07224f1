"""The work of each step for one task: read what still needs work, call the pure core, write.

Plain functions with no Dagster in them, so the ops stay thin and the benchmark and tests can
drive a step directly. A failure is confined to the smallest unit: one ListJobs batch, one
recording, one lead's follow-up. It is logged with what and why, the rest of the batch goes on,
and the step reports what failed so that its op can fail (and be retried) after saving the rest.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

from sqlalchemy import Engine

from call_pipeline.clients.dashscope_llm import LlmClient, LlmError
from call_pipeline.clients.outboundbot import OutboundBotClient, OutboundBotError
from call_pipeline.crm import repository as repo
from call_pipeline.domain.call_results import parse_list_jobs_body
from call_pipeline.domain.followups import (
    FollowUp,
    InvalidLlmAnswer,
    ai_fallback_follow_up,
    basic_follow_up,
    build_llm_messages,
    parse_llm_answer,
    plan_follow_up,
)
from call_pipeline.domain.matching import match_jobs_to_leads, parse_jobs_page
from call_pipeline.domain.task_state import TASK_CALLING, TASK_CALLS_DONE, TASK_FOLLOW_UP_DONE, decide_task_type

log = logging.getLogger(__name__)

RECORDING_THREADS = 8
_LEGACY_REFERENCE = re.compile(r"task_\d+_lead_(\d+)")
INVALID_TASK_ID_CODES = {"InvalidParameter", "InvalidTaskId", "TaskNotFound", "NoSignatureUrl"}


class StepFailed(RuntimeError):
    """Some units of a step failed; the others were saved. The message lists which and why."""


@dataclass(frozen=True)
class PageBatch:
    """One page of a job group: the batch that steps 3-5 work on."""

    task_id: int
    page_number: int
    job_ids: tuple[str, ...]
    match_counts: dict[str, int] = field(default_factory=dict)


@dataclass
class StepReport:
    """What a step did, for logs and the run summary."""

    counts: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, key: str, amount: int = 1) -> None:
        # Units run in worker threads; Counter's += is not atomic.
        with self._lock:
            self.counts[key] += amount

    def fail(self, message: str) -> None:
        with self._lock:
            self.failures.append(message)

    def raise_if_failed(self, what: str) -> None:
        if self.failures:
            shown = "; ".join(self.failures[:20])
            more = f" (+{len(self.failures) - 20} more)" if len(self.failures) > 20 else ""
            raise StepFailed(f"{what}: {len(self.failures)} unit(s) failed and will be retried: {shown}{more}")


# ---- step 2 -----------------------------------------------------------------------------------


def count_job_pages(client: OutboundBotClient, job_group_id: str, page_size: int) -> tuple[int, dict]:
    """Total pages of the job group, from one ListJobsByGroup call (its first page is returned
    too, so the first page's step need not fetch it again)."""
    body = client.list_jobs_by_group(job_group_id, 1, page_size)
    total = parse_jobs_page(body).total_count
    return (total + page_size - 1) // page_size, body


def match_page(
    engine: Engine,
    client: OutboundBotClient,
    task: repo.TaskRow,
    page_number: int,
    page_size: int,
    now: datetime,
    logger: logging.Logger | None = None,
    prefetched_body: dict | None = None,
) -> PageBatch:
    """Step 2 for one page: one read of the task's unmatched leads, one bulk write."""
    logger = logger or log
    body = prefetched_body or client.list_jobs_by_group(task.job_group_id, page_number, page_size)
    page = parse_jobs_page(body)
    for problem in page.problems:
        logger.warning("task %s page %s: %s", task.id, page_number, problem)
    job_ids = [job.job_id for job in page.jobs]
    reference_ids = [ref for job in page.jobs for ref in job.reference_ids if ref]
    legacy_leads_ids = [int(m.group(1)) for ref in reference_ids
                        if (m := _LEGACY_REFERENCE.fullmatch(ref)) and m.group(0).startswith(f"task_{task.id}_")]
    with engine.begin() as conn:
        assigned = repo.fetch_assigned_job_ids(conn, task.id, job_ids)
        leads = repo.fetch_leads_for_matching(conn, task.id, reference_ids, legacy_leads_ids)
        result = match_jobs_to_leads([job for job in page.jobs if job.job_id not in assigned], leads, task.id)
        written = repo.assign_jobs_to_leads(conn, task.id, result.matches, now)
    for conflict in result.conflicts:
        logger.warning("task %s page %s: %s", task.id, page_number, conflict)
    counts = result.counts()
    counts["already_matched"] = counts.get("already_matched", 0) + len(assigned)
    counts["jobs_listed"] = len(job_ids)
    counts["lost_to_concurrent_run"] = len(result.matches) - written
    if counts["lost_to_concurrent_run"]:
        logger.warning("task %s page %s: %d lead(s) got a job from another run meanwhile; their jobs "
                       "are matched again on the next run", task.id, page_number, counts["lost_to_concurrent_run"])
    return PageBatch(task.id, page_number, tuple(job_ids), counts)


# ---- step 3 -----------------------------------------------------------------------------------


def fetch_call_results(
    engine: Engine,
    client: OutboundBotClient,
    task_id: int,
    job_ids: Sequence[str] | None,
    zone: ZoneInfo,
    now: datetime,
    logger: logging.Logger | None = None,
) -> StepReport:
    """Step 3 for a batch (or, with `job_ids=None`, for the whole task): ListJobs in calls of at
    most 99 ids for the leads whose status is empty or not terminal."""
    logger = logger or log
    report = StepReport()
    with engine.connect() as conn:
        needed = repo.fetch_job_ids_needing_results(conn, task_id, job_ids)
    report.counts["jobs_queried"] = len(needed)
    batches = [needed[i:i + 99] for i in range(0, len(needed), 99)]
    for batch in batches:
        try:
            body = client.list_jobs(batch)
        except OutboundBotError as exc:
            report.fail(f"ListJobs for {len(batch)} job(s) starting {batch[0]}: {exc}")
            logger.error("task %s: ListJobs batch of %d job(s) failed: %s", task_id, len(batch), exc)
            continue
        parsed = parse_list_jobs_body(body, batch, zone)
        for problem in parsed.problems:
            logger.warning("task %s: %s", task_id, problem)
        for result in parsed.results:
            for problem in result.problems:
                logger.warning("task %s job %s: %s", task_id, result.job_id, problem)
        if parsed.missing_job_ids:
            report.counts["jobs_not_returned"] += len(parsed.missing_job_ids)
            logger.warning("task %s: ListJobs did not return %d job(s) (retried next run): %s", task_id,
                           len(parsed.missing_job_ids), ", ".join(parsed.missing_job_ids[:10]))
        with engine.begin() as conn:
            report.counts["results_stored"] += repo.store_call_results(conn, task_id, parsed.results, now)
        for result in parsed.results:
            report.counts[f"status:{result.call_status or '(none)'}"] += 1
    return report


# ---- step 4 -----------------------------------------------------------------------------------


def fetch_recordings(
    engine: Engine,
    client: OutboundBotClient,
    task_id: int,
    job_ids: Sequence[str] | None,
    now: datetime,
    logger: logging.Logger | None = None,
) -> StepReport:
    """Step 4: a failed download leaves `recording_url` empty with a warning (tried again next
    run); an invalid task id is skipped with a warning. Neither fails the step."""
    logger = logger or log
    report = StepReport()
    with engine.connect() as conn:
        leads = repo.fetch_leads_needing_recording(conn, task_id, job_ids)
    if not leads:
        return report

    def download(lead: repo.LeadForRecording) -> tuple[int, str | None]:
        try:
            return lead.lead_row_id, client.download_recording(lead.call_task_id)
        except OutboundBotError as exc:
            if exc.code in INVALID_TASK_ID_CODES:
                report.add("recordings_invalid_task_id")
                logger.warning("task %s job %s: recording skipped, invalid call task id %s: %s",
                               task_id, lead.call_job_id, lead.call_task_id, exc)
            else:
                report.add("recordings_failed")
                logger.warning("task %s job %s: recording not fetched (retried next run): %s",
                               task_id, lead.call_job_id, exc)
            return lead.lead_row_id, None

    with ThreadPoolExecutor(max_workers=min(RECORDING_THREADS, len(leads))) as pool:
        fetched = [(row_id, url) for row_id, url in pool.map(download, leads) if url]
    with engine.begin() as conn:
        report.counts["recordings_fetched"] += repo.store_recording_urls(conn, fetched, now)
    return report


# ---- step 5 -----------------------------------------------------------------------------------


def write_follow_up_for_lead(
    engine: Engine,
    llm: LlmClient,
    lead: repo.LeadForFollowUp,
    now: datetime,
    logger: logging.Logger,
) -> FollowUp | None:
    """Decide one lead's follow-up (LLM or basic) and write it. Returns what was written, or None
    when there was nothing to do or another run wrote it first."""
    plan = plan_follow_up(lead.call_status, lead.call_conversation)
    if plan == "skip":
        return None
    if plan == "basic":
        follow_up = basic_follow_up(lead.call_status or "")
    else:
        try:
            answer = llm.complete(build_llm_messages(lead.call_conversation or "[]", now))
            follow_up = parse_llm_answer(answer, now)
        except LlmError as exc:
            logger.warning("job %s: AI analysis unavailable, basic follow-up written: %s", lead.call_job_id, exc)
            follow_up = ai_fallback_follow_up(exc.code or "LLM error")
        except InvalidLlmAnswer as exc:
            logger.warning("job %s: the model's answer was invalid (%s), basic follow-up written",
                           lead.call_job_id, exc)
            follow_up = ai_fallback_follow_up(f"invalid answer: {exc}")
    follow_id = repo.create_follow_up(engine, lead, follow_up, now)
    if follow_id is None:
        logger.info("job %s: follow-up already written by another run", lead.call_job_id)
        return None
    return follow_up


def create_follow_ups(
    engine: Engine,
    llm: LlmClient,
    task_id: int,
    job_ids: Sequence[str] | None,
    now: datetime,
    logger: logging.Logger | None = None,
    threads: int = 8,
) -> StepReport:
    """Step 5 for a batch: LLM calls run in parallel (the LLM client's shared limit bounds them),
    and each lead's follow-up is written in its own transaction as soon as it is decided."""
    logger = logger or log
    report = StepReport()
    with engine.connect() as conn:
        leads = repo.fetch_leads_needing_follow_up(conn, task_id, job_ids)
    if not leads:
        return report

    def one(lead: repo.LeadForFollowUp) -> None:
        try:
            follow_up = write_follow_up_for_lead(engine, llm, lead, now, logger)
        except Exception as exc:  # one lead's failure must not lose the others' work
            report.fail(f"job {lead.call_job_id}: {type(exc).__name__}: {exc}")
            logger.error("task %s job %s: follow-up not written (retried next run): %s: %s",
                         task_id, lead.call_job_id, type(exc).__name__, exc)
            return
        if follow_up is not None:
            report.add(f"follow_ups:{follow_up.is_interested}")
            report.add(f"source:{follow_up.source}")

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(leads)))) as pool:
        list(pool.map(one, leads))
    return report


# ---- after the last page ------------------------------------------------------------------------


def mark_unmatched_leads(engine: Engine, task_id: int, now: datetime) -> int:
    with engine.begin() as conn:
        return repo.mark_unmatched_leads_failed(conn, task_id, now)


def advance_task_state(engine: Engine, task_id: int, now: datetime) -> tuple[int | None, int | None]:
    """Evaluate SPEC §4 for one task and move it up (2 → 3 → 4 possibly at once). Returns the
    task's type before and after; (None, None) when the task does not exist."""
    with engine.begin() as conn:
        task = repo.fetch_task(conn, task_id)
        if task is None:
            return None, None
        before = task.task_type
        target = decide_task_type(before, repo.count_task_leads(conn, task_id))
        current = before
        if current == TASK_CALLING and target >= TASK_CALLS_DONE and repo.advance_task_type(
            conn, task_id, TASK_CALLING, TASK_CALLS_DONE, now
        ):
            current = TASK_CALLS_DONE
        if current == TASK_CALLS_DONE and target >= TASK_FOLLOW_UP_DONE and repo.advance_task_type(
            conn, task_id, TASK_CALLS_DONE, TASK_FOLLOW_UP_DONE, now
        ):
            current = TASK_FOLLOW_UP_DONE
    return before, current
