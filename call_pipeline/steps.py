"""The work of each step for one task: read what still needs work, call the pure core, write.

Plain functions with no Dagster in them, so the ops stay thin and the benchmark and tests can
drive a step directly. A failure is confined to the smallest unit: one ListJobs batch, one
recording, one lead's follow-up. It is logged with what and why, the rest of the batch goes on,
and the step reports what failed so that its op can fail (and be retried) after saving the rest.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

from sqlalchemy import Engine
from sqlalchemy.exc import DataError

from call_pipeline.clients.dashscope_llm import LlmClient, LlmError
from call_pipeline.clients.outboundbot import OutboundBotClient, OutboundBotError
from call_pipeline.crm import repository as repo
from call_pipeline.domain.call_results import NON_TERMINAL_JOB_STATUSES, parse_list_jobs_body
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
    """The jobs of one or more consecutive pages of a job group: the batch that steps 3-5 work
    on. `page_number` is its first page, which also names the batch."""

    task_id: int
    page_number: int
    job_ids: tuple[str, ...]
    match_counts: dict[str, int] = field(default_factory=dict)
    page_count: int = 1

    @property
    def label(self) -> str:
        last = self.page_number + self.page_count - 1
        return f"page {self.page_number}" if last == self.page_number else f"pages {self.page_number}-{last}"


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

    def merge(self, other: StepReport) -> None:
        with self._lock:
            self.counts.update(other.counts)
            self.failures.extend(other.failures)

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


def batch_pages(pages: int, pages_per_batch: int) -> list[tuple[int, int]]:
    """(first page, page count) of each batch of up to `pages_per_batch` consecutive pages."""
    if pages_per_batch < 1:
        raise ValueError(f"pages_per_batch must be at least 1, got {pages_per_batch}")
    return [(first, min(pages_per_batch, pages - first + 1)) for first in range(1, pages + 1, pages_per_batch)]


def match_page(
    engine: Engine,
    client: OutboundBotClient,
    task: repo.TaskRow,
    page_number: int,
    page_size: int,
    now: datetime,
    logger: logging.Logger | None = None,
    prefetched_body: dict | None = None,
    page_count: int = 1,
) -> PageBatch:
    """Step 2 for a batch of `page_count` pages from `page_number`: one ListJobsByGroup call per
    page, then one read of the leads the batch's jobs can concern and one bulk write."""
    logger = logger or log
    jobs = []
    for number in range(page_number, page_number + page_count):
        body = prefetched_body if number == page_number and prefetched_body else client.list_jobs_by_group(
            task.job_group_id, number, page_size)
        page = parse_jobs_page(body)
        for problem in page.problems:
            logger.warning("task %s page %s: %s", task.id, number, problem)
        jobs.extend(page.jobs)
    label = PageBatch(task.id, page_number, (), page_count=page_count).label
    job_ids = [job.job_id for job in jobs]
    reference_ids = [ref for job in jobs for ref in job.reference_ids if ref]
    legacy_leads_ids = [int(m.group(1)) for ref in reference_ids
                        if (m := _LEGACY_REFERENCE.fullmatch(ref)) and m.group(0).startswith(f"task_{task.id}_")]
    with repo.write_transaction(engine) as conn:
        # First only the leads that the jobs' reference ids name (and those already holding one of
        # the jobs); the task's free leads (for phone matching) are read only when some job found
        # no lead that way.
        leads = repo.fetch_leads_for_matching(conn, task.id, reference_ids, legacy_leads_ids, free_leads=False,
                                              job_ids=job_ids)
        result = match_jobs_to_leads(jobs, leads, task.id)
        if result.unmatched_job_ids:
            leads = repo.fetch_leads_for_matching(conn, task.id, reference_ids, legacy_leads_ids, job_ids=job_ids)
            result = match_jobs_to_leads(jobs, leads, task.id)
        written = repo.assign_jobs_to_leads(conn, task.id, result.matches, now)
    for conflict in result.conflicts:
        logger.warning("task %s %s: %s", task.id, label, conflict)
    counts = result.counts()
    counts["jobs_listed"] = len(job_ids)
    counts["lost_to_concurrent_run"] = len(result.matches) - written
    if counts["lost_to_concurrent_run"]:
        logger.warning("task %s %s: %d lead(s) got a job from another run meanwhile; their jobs "
                       "are matched again on the next run", task.id, label, counts["lost_to_concurrent_run"])
    return PageBatch(task.id, page_number, tuple(job_ids), counts, page_count)


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
    # The answers of several ListJobs calls (a batch's, or about STORED_TOGETHER jobs of a whole
    # task) are written in one transaction; more at once would hold too many transcripts in memory.
    pending: list = []
    for number, batch in enumerate(batches, start=1):
        try:
            body = client.list_jobs(batch)
        except OutboundBotError as exc:
            report.fail(f"ListJobs for {len(batch)} job(s) starting {batch[0]}: {exc}")
            logger.error("task %s: ListJobs batch of %d job(s) failed: %s", task_id, len(batch), exc)
        else:
            parsed = parse_list_jobs_body(body, batch, zone)
            for problem in parsed.problems:
                logger.warning("task %s: %s", task_id, problem)
            for result in parsed.results:
                # A job still waiting to be dialled has no call attempts yet: expected, not a problem.
                waiting = result.call_status in NON_TERMINAL_JOB_STATUSES
                for problem in result.problems:
                    (logger.debug if waiting else logger.warning)("task %s job %s: %s", task_id, result.job_id,
                                                                  problem)
            if parsed.missing_job_ids:
                report.counts["jobs_not_returned"] += len(parsed.missing_job_ids)
                logger.warning("task %s: ListJobs did not return %d job(s) (retried next run): %s", task_id,
                               len(parsed.missing_job_ids), ", ".join(parsed.missing_job_ids[:10]))
            pending.extend(parsed.results)
        if pending and (len(pending) >= STORED_TOGETHER or number == len(batches)):
            _store_call_results(engine, task_id, pending, now, report, logger)
            pending = []
    return report


STORED_TOGETHER = 500  # jobs' results per write, at most (plus one ListJobs answer)


def _store_call_results(engine: Engine, task_id: int, results: list, now: datetime, report: StepReport,
                        logger: logging.Logger) -> None:
    try:
        with repo.write_transaction(engine) as conn:
            report.counts["results_stored"] += repo.store_call_results(conn, task_id, results, now)
    except DataError:
        # A value the CRM's column cannot hold (say a status longer than 32 characters) fails
        # the whole bulk write: store the batch lead by lead, so that only that lead is left out.
        for result in results:
            try:
                with repo.write_transaction(engine) as conn:
                    report.counts["results_stored"] += repo.store_call_results(conn, task_id, [result], now)
            except DataError as exc:
                report.add("results_not_stored")
                logger.warning("task %s job %s: call results not stored, the CRM refused them (queried again "
                               "next run): %s", task_id, result.job_id, getattr(exc, "orig", exc))
    for result in results:
        report.counts[f"status:{result.call_status or '(none)'}"] += 1


# ---- step 4 -----------------------------------------------------------------------------------


def fetch_recordings(
    engine: Engine,
    client: OutboundBotClient,
    task_id: int,
    job_ids: Sequence[str] | None,
    now: datetime,
    logger: logging.Logger | None = None,
) -> StepReport:
    """Step 4: a failed download leaves `recording_url` empty with a warning and is reported as a
    failed unit (after the other recordings are saved), so that the run fails before the task's
    state is advanced: a task that reached 4 is never run again, and its recording would be lost.
    An invalid task id is skipped with a warning and does not fail the step."""
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
                report.fail(f"recording of job {lead.call_job_id}: {exc}")
                logger.warning("task %s job %s: recording not fetched (retried next run): %s",
                               task_id, lead.call_job_id, exc)
            return lead.lead_row_id, None

    with ThreadPoolExecutor(max_workers=min(RECORDING_THREADS, len(leads))) as pool:
        fetched = [(row_id, url) for row_id, url in pool.map(download, leads) if url]
    with repo.write_transaction(engine) as conn:
        report.counts["recordings_fetched"] += repo.store_recording_urls(conn, fetched, now)
    return report


# ---- step 5 -----------------------------------------------------------------------------------


class FollowUpWriter:
    """Writes follow-ups for every thread of this process, from one thread on one connection.
    The shared LLM pool's workers hand it their decided follow-up and go on; what arrives within
    `GATHER_SECONDS` is written together (`repository.create_follow_ups_on`: one transaction,
    each lead's insert and conditional link in it), so that 10,000 follow-ups cost a few hundred
    commits instead of 10,000 (the commit, an fsync, was most of the database time); a batch
    that fails is written lead by lead (`create_follow_up_on`), so only the lead at fault fails.
    Writing from one thread also keeps the workers from contending for the database (on SQLite,
    for its single write lock)."""

    # Leads handed over without waiting (the shared LLM pool) are gathered this long; a caller
    # that waits for its write is served at once.
    GATHER_SECONDS = 2.0
    MAX_BATCH = 200

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="call-pipeline-follow-up-writer", daemon=True)
        self._thread.start()

    def submit(self, lead: repo.LeadForFollowUp, follow_up: FollowUp, now: datetime) -> Future:
        """Queue a follow-up; the future gives the new follow id, or None when the lead already
        had a follow-up, or raises what the database raised."""
        future: Future = Future()
        self._queue.put((lead, follow_up, now, future, False))
        return future

    def write(self, lead: repo.LeadForFollowUp, follow_up: FollowUp, now: datetime) -> int | None:
        """`submit`, waiting for the answer; a caller that waits is not made to wait for a batch."""
        future: Future = Future()
        self._queue.put((lead, follow_up, now, future, True))
        return future.result()

    def flush(self, written: Future | None = None) -> None:
        """Write what is gathered now: somebody waits for it (the wait after the last page).
        `written`, if given, completes once everything queued before this call is written."""
        self._queue.put(written)

    def drain(self, timeout: float) -> bool:
        """Write everything queued so far and wait for it; False if that took over `timeout`."""
        written: Future = Future()
        self.flush(written)
        try:
            written.result(timeout)
        except TimeoutError:
            return False
        return True

    def _gather(self) -> tuple[list[tuple], list[Future]]:
        """The next batch, and the flush markers met while gathering it (queue order: what was
        queued before a marker is in this batch or written already)."""
        markers: list[Future] = []
        first = self._queue.get()
        if first is None or isinstance(first, Future):
            return [], [first] if first is not None else []
        batch = [first]
        deadline = time.monotonic() + (0.0 if first[4] else self.GATHER_SECONDS)
        while len(batch) < self.MAX_BATCH:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None or isinstance(item, Future):
                if item is not None:
                    markers.append(item)
                break
            batch.append(item)
        return batch, markers

    def _run(self) -> None:
        conn = None
        while True:
            batch, markers = self._gather()
            if batch:
                conn = self._write(conn, batch)
            for marker in markers:
                marker.set_result(None)

    def _write(self, conn, batch: list[tuple]):
        try:
            if conn is None:
                conn = self.engine.connect()
            now = max(item[2] for item in batch)
            ids = repo.create_follow_ups_on(conn, [(item[0], item[1]) for item in batch], now)
        except BaseException as exc:
            conn = self._drop(conn)
            if len(batch) == 1:
                batch[0][3].set_exception(exc)  # handed to the waiting worker
                return conn
            # the batch rolled back as a whole: write its leads one by one, so that only a lead
            # that cannot be written fails
            log.info("follow-up batch of %d not written together (%s); writing them one by one",
                     len(batch), type(exc).__name__)
        else:
            for item, follow_id in zip(batch, ids, strict=True):
                item[3].set_result(follow_id)
            return conn
        for lead, follow_up, now, future, _ in batch:
            try:
                if conn is None:
                    conn = self.engine.connect()
                future.set_result(repo.create_follow_up_on(conn, lead, follow_up, now))
            except BaseException as exc:  # handed to the waiting worker
                future.set_exception(exc)
                conn = self._drop(conn)
        return conn

    @staticmethod
    def _drop(conn):
        # After a failed write the connection may be dead: the next write checks out a fresh one.
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        return None


_writers: dict[str, FollowUpWriter] = {}
_writers_lock = threading.Lock()


def flush_follow_up_writers() -> None:
    with _writers_lock:
        writers = list(_writers.values())
    for writer in writers:
        writer.flush()


def drain_follow_up_writers(timeout: float = 120.0) -> None:
    """At process exit: write what the writers still hold. Their thread is a daemon, which the
    interpreter would stop mid-queue; the step-5 pool's workers (not daemons) have finished and
    handed everything over by the time `atexit` runs. A process whose step ops queued work and
    ended (the multiprocess or Celery executor) thus writes it before it goes."""
    with _writers_lock:
        writers = list(_writers.values())
    for writer in writers:
        if not writer.drain(timeout):
            log.warning("follow-up writer did not finish within %.0f s at exit; the next run writes the rest",
                        timeout)


def follow_up_writer(engine: Engine) -> FollowUpWriter:
    """The writer for `engine`'s database (one per database and process)."""
    key = engine.url.render_as_string(hide_password=False)
    with _writers_lock:
        if not _writers:
            atexit.register(drain_follow_up_writers)
        writer = _writers.get(key)
        if writer is None:
            writer = _writers[key] = FollowUpWriter(engine)
        writer.engine = engine  # an engine made anew for the same database (after dispose) replaces the old
        return writer


def decide_follow_up(llm: LlmClient, lead: repo.LeadForFollowUp, now: datetime,
                     logger: logging.Logger) -> FollowUp | None:
    """One lead's follow-up (LLM or basic, SPEC §3 step 5), or None when it has none yet."""
    plan = plan_follow_up(lead.call_status, lead.call_conversation)
    if plan == "skip":
        return None
    if plan == "basic":
        return basic_follow_up(lead.call_status or "")
    try:
        answer = llm.complete(build_llm_messages(lead.call_conversation or "[]", now))
        return parse_llm_answer(answer, now)
    except LlmError as exc:
        logger.warning("job %s: AI analysis unavailable, basic follow-up written: %s", lead.call_job_id, exc)
        return ai_fallback_follow_up(exc.code or "LLM error")
    except InvalidLlmAnswer as exc:
        logger.warning("job %s: the model's answer was invalid (%s), basic follow-up written", lead.call_job_id, exc)
        return ai_fallback_follow_up(f"invalid answer: {exc}")


def write_follow_up_for_lead(
    engine: Engine,
    llm: LlmClient,
    lead: repo.LeadForFollowUp,
    now: datetime,
    logger: logging.Logger,
) -> FollowUp | None:
    """Decide one lead's follow-up and write it, waiting for the write. Returns what was
    written, or None when there was nothing to do or another run wrote it first."""
    follow_up = decide_follow_up(llm, lead, now, logger)
    if follow_up is None:
        return None
    follow_id = follow_up_writer(engine).write(lead, follow_up, now)
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
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(leads)))) as pool:
        list(pool.map(lambda lead: follow_up_one_lead(engine, llm, task_id, lead, lambda: now, logger, report),
                      leads))
    return report


def _follow_up_failed(report: StepReport, logger: logging.Logger, task_id: int, lead: repo.LeadForFollowUp,
                      exc: BaseException) -> None:
    """One lead's follow-up failed: counted for its step, logged, and picked up by the next run."""
    report.fail(f"job {lead.call_job_id}: {type(exc).__name__}: {exc}")
    logger.error("task %s job %s: follow-up not written (retried next run): %s: %s",
                 task_id, lead.call_job_id, type(exc).__name__, exc)


def follow_up_one_lead(engine: Engine, llm: LlmClient, task_id: int, lead: repo.LeadForFollowUp,
                       clock: Callable[[], datetime], logger: logging.Logger, report: StepReport) -> None:
    """Step 5 for one lead, counted in `report`; its failure is recorded there, never raised, so
    that one lead's failure does not lose the others' work."""
    try:
        follow_up = write_follow_up_for_lead(engine, llm, lead, clock(), logger)
    except Exception as exc:
        _follow_up_failed(report, logger, task_id, lead, exc)
        return
    if follow_up is not None:
        report.add(f"follow_ups:{follow_up.is_interested}")
        report.add(f"source:{follow_up.source}")


def queue_follow_up_of_lead(engine: Engine, llm: LlmClient, task_id: int, lead: repo.LeadForFollowUp,
                            clock: Callable[[], datetime], logger: logging.Logger, report: StepReport,
                            written: list[Future]) -> None:
    """Step 5 for one lead in the shared LLM pool: decide, then hand the follow-up to the writer
    without waiting for it, so that the worker takes the next lead at once and the writer can
    gather many leads into one transaction. `written` gets a future that completes (never with
    an error) once the write is done and counted in `report`."""
    done: Future = Future()
    try:
        now = clock()
        follow_up = decide_follow_up(llm, lead, now, logger)
        if follow_up is None:
            done.set_result(None)
            written.append(done)
            return
        pending = follow_up_writer(engine).submit(lead, follow_up, now)
    except Exception as exc:  # one lead's failure must not lose the others' work
        _follow_up_failed(report, logger, task_id, lead, exc)
        done.set_result(None)
        written.append(done)
        return

    def count(future: Future) -> None:
        try:
            error = future.exception()
            if error is not None:
                _follow_up_failed(report, logger, task_id, lead, error)
            elif future.result() is None:
                logger.info("job %s: follow-up already written by another run", lead.call_job_id)
            else:
                report.add(f"follow_ups:{follow_up.is_interested}")
                report.add(f"source:{follow_up.source}")
        finally:
            done.set_result(None)

    written.append(done)
    pending.add_done_callback(count)


# ---- steps 4 and 5 across pages: shared pools, waited for after the last page -------------------
#
# The in-process executor runs one step at a time. When each page's step-4 and step-5 ops made
# their own calls, step 4 of a page never overlapped step 5, and the LLM pool drained at every
# page boundary: 2.10 x the bound the cloud allows for 10,000 leads (`call-pipeline bench`); the
# same ops on dagster-async-executor 0.0.4 reached 1.23 x; with the shared pools below, 1.02 x
# (MariaDB) and 1.03 x (SQLite). Instead, a page's step-4 and step-5 ops read what the page
# needs, hand it to process-wide pools and return; the op after `.collect()`
# (`finish_page_work`) waits for all of it and fails if any unit failed.
# The LLM pool thus stays full across pages, and recordings, results and matching of later pages
# run meanwhile. Work that this process does not hold (an op retry, a re-execution from failure,
# a step run in another process) is redone from the CRM by the wait op: every write is guarded,
# so redoing is always safe. The shared limits (rate limiter, LLM semaphore) still bound the calls.

RECORDINGS = "recordings"
FOLLOW_UPS = "follow_ups"
# Workers beyond the LLM limit: a worker writing its follow-up to the CRM has released its LLM slot,
# and a spare worker takes that slot meanwhile (the shared semaphore still caps calls in flight).
LLM_SPARE_WORKERS = 2
RECORDING_PAGES_AT_ONCE = 2
# Back-pressure: a page op waits while this much of its kind is queued and not finished, which
# bounds memory (queued leads carry their transcripts) and the work left behind by a failed run.
QUEUED_FOLLOW_UPS_PER_LLM_SLOT = 25
QUEUED_RECORDING_PAGES = 4

_pools: dict[tuple[str, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _shared_pool(kind: str, workers: int) -> ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get((kind, workers))
        if pool is None:
            pool = _pools[(kind, workers)] = ThreadPoolExecutor(max_workers=workers,
                                                                thread_name_prefix=f"call-pipeline-{kind}")
        return pool


def shutdown_background_work() -> None:
    """Stop the shared pools after their queued work (the benchmark; a process exit does it too)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.shutdown(wait=True)


@dataclass(frozen=True)
class PageTicket:
    """What a page's step-4 or step-5 op handed to the shared pools: enough for the wait op to find
    that work, or to redo it from the CRM when this process does not hold it."""

    kind: str
    task_id: int
    page_number: int
    job_ids: tuple[str, ...]
    queued: int  # leads for follow-ups; for recordings, 1 (the page)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.kind, self.task_id, self.page_number)


@dataclass
class _PageWork:
    futures: list[Future] = field(default_factory=list)
    report: StepReport = field(default_factory=StepReport)
    written: list[Future] = field(default_factory=list)  # follow-up writes; filled as leads are decided
    retries: list[_PageWork] = field(default_factory=list)  # the same page's op run again in this run

    def settle(self) -> list[tuple[Future, _PageWork]]:
        """Wait for this page's work (and its retries'); return the failed pool futures."""
        failed = []
        for work in (self, *self.retries):
            for future in work.futures:
                if future.exception() is not None:
                    failed.append((future, work))
            # every lead is decided once its pool future is done, so `written` is complete now
            if not all(future.done() for future in work.written):
                flush_follow_up_writers()
            wait(list(work.written))
            if work is not self:
                self.report.merge(work.report)
        return failed


class RunPageWork:
    """One run's step-4/5 work in this process, by page."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        # Set when a step of the run failed for good: the wait op will not run, so later page ops
        # do their work themselves instead of leaving it behind in the pools.
        self.inline = False
        self._pages: dict[tuple[str, int, int], _PageWork] = {}
        self._futures: list[Future] = []
        self._queued: Counter = Counter()
        self._cond = threading.Condition()

    # -- handing work over ---------------------------------------------------------------------

    def _reserve(self, kind: str, units: int, limit: int) -> None:
        # A batch is admitted while less than `limit` is queued, whatever its size: waiting for
        # room for all of it would let the pool run dry at every batch boundary.
        with self._cond:
            while self._queued[kind] >= limit:
                self._cond.wait()
            self._queued[kind] += units

    def _release(self, kind: str, units: int) -> None:
        with self._cond:
            self._queued[kind] -= units
            self._cond.notify_all()

    def _unit(self, kind: str, fn: Callable, *args) -> None:
        try:
            fn(*args)
        finally:
            self._release(kind, 1)

    def _register(self, ticket: PageTicket, work: _PageWork) -> PageTicket:
        with self._cond:
            held = self._pages.get(ticket.key)
            if held is None:
                self._pages[ticket.key] = work
            else:  # the op ran again in this run (an op retry): keep both
                held.retries.append(work)
            self._futures.extend(work.futures)
        return ticket

    def queue_recordings(self, engine: Engine, client: OutboundBotClient, task_id: int, page_number: int,
                         job_ids: Sequence[str], clock: Callable[[], datetime],
                         logger: logging.Logger | None = None) -> PageTicket:
        """Step 4 for a page, in the shared recording pool (or here, once the run has failed)."""
        logger = logger or log
        ticket = PageTicket(RECORDINGS, task_id, page_number, tuple(job_ids), 1)
        work = _PageWork()

        def page() -> None:
            work.report.merge(fetch_recordings(engine, client, task_id, job_ids, clock(), logger))

        if self.inline:
            page()
        else:
            self._reserve(RECORDINGS, 1, QUEUED_RECORDING_PAGES)
            work.futures.append(_shared_pool(RECORDINGS, RECORDING_PAGES_AT_ONCE).submit(self._unit, RECORDINGS, page))
        return self._register(ticket, work)

    def queue_follow_ups(self, engine: Engine, llm: LlmClient, task_id: int, page_number: int,
                         job_ids: Sequence[str], clock: Callable[[], datetime], concurrency: int,
                         logger: logging.Logger | None = None) -> PageTicket:
        """Step 5 for a page: its leads go one by one to the shared LLM pool (or are done here,
        once the run has failed). Each lead's follow-up is one transaction, as in
        `create_follow_ups`."""
        logger = logger or log
        with engine.connect() as conn:
            leads = repo.fetch_leads_needing_follow_up(conn, task_id, job_ids)
        ticket = PageTicket(FOLLOW_UPS, task_id, page_number, tuple(job_ids), len(leads))
        work = _PageWork()
        if self.inline:
            with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(leads)))) as pool:
                list(pool.map(lambda lead: follow_up_one_lead(engine, llm, task_id, lead, clock, logger,
                                                              work.report), leads))
        elif leads:
            self._reserve(FOLLOW_UPS, len(leads), concurrency * QUEUED_FOLLOW_UPS_PER_LLM_SLOT)
            pool = _shared_pool("llm", concurrency + LLM_SPARE_WORKERS)
            # The pool futures complete when a lead is decided and handed to the writer; the
            # writes themselves are awaited through `written`, after them.
            written: list[Future] = []
            work.futures.extend(
                pool.submit(self._unit, FOLLOW_UPS, queue_follow_up_of_lead, engine, llm, task_id, lead, clock,
                            logger, work.report, written)
                for lead in leads
            )
            work.written = written
        return self._register(ticket, work)

    # -- waiting -------------------------------------------------------------------------------

    def _take(self, key: tuple[str, int, int]) -> _PageWork | None:
        with self._cond:
            return self._pages.pop(key, None)

    def finish(self, tickets: Sequence[PageTicket], redo: Callable[[PageTicket], None]) -> StepReport:
        """Wait for the work behind every ticket. A ticket whose work this process does not hold
        is redone first, through `redo` (which queues it again from what the CRM still needs)."""
        report = StepReport()
        held: list[tuple[PageTicket, _PageWork]] = []
        for ticket in tickets:
            work = self._take(ticket.key)
            if work is None:
                report.add(f"{ticket.kind}_pages_redone")
                redo(ticket)
                work = self._take(ticket.key) or _PageWork()
            held.append((ticket, work))
        for ticket, work in held:
            for future, _ in work.settle():
                error = future.exception()
                report.fail(f"{ticket.kind} of page {ticket.page_number}: {type(error).__name__}: {error}")
            report.merge(work.report)
        return report

    def drain(self) -> None:
        """Do new work inline from now on, and wait for what is queued."""
        self.inline = True
        with self._cond:
            futures = list(self._futures)
            pages = list(self._pages.values())
        wait(futures)
        for page in pages:
            page.settle()


_runs: dict[str, RunPageWork] = {}
_runs_lock = threading.Lock()
_RUNS_KEPT = 64


def run_page_work(run_id: str) -> RunPageWork:
    """The step-4/5 work of run `run_id` in this process."""
    stale: list[RunPageWork] = []
    with _runs_lock:
        work = _runs.get(run_id)
        if work is None:
            # runs whose wait op never ran (they failed) are forgotten, oldest first
            stale = [_runs.pop(key) for key in list(_runs)[: max(0, len(_runs) - _RUNS_KEPT + 1)]]
            work = _runs[run_id] = RunPageWork(run_id)
    for old in stale:
        old.drain()
    return work


def forget_run_page_work(run_id: str) -> None:
    with _runs_lock:
        _runs.pop(run_id, None)


def drain_run_page_work(run_id: str) -> None:
    """A step of the run failed for good, so its wait op will not run: wait for the run's queued
    work here, and have its later page ops work inline, so that nothing outlives the run."""
    with _runs_lock:
        work = _runs.get(run_id)
    if work is not None:
        work.drain()


# ---- after the last page ------------------------------------------------------------------------


def catch_up_task(engine: Engine, client: OutboundBotClient, llm: LlmClient, task: repo.TaskRow, page_size: int,
                  zone: ZoneInfo, now: datetime, logger: logging.Logger | None = None,
                  threads: int = 8, pages_per_batch: int = 1) -> StepReport:
    """Steps 2 to 5 for the whole task, doing only what the CRM still needs: what a re-execution
    from failure must do itself. Dagster re-executes the failed and interrupted steps of the
    parent run and what follows them, but not the mapped steps that never started (a run whose
    process was killed): without this, their pages would be missing from the re-execution, their
    leads marked unmatched and the task concluded. Every write is guarded, so redoing is safe."""
    logger = logger or log
    report = StepReport()
    pages, first_body = count_job_pages(client, task.job_group_id, page_size)
    for page_number, page_count in batch_pages(pages, pages_per_batch):
        batch = match_page(engine, client, task, page_number, page_size, now, logger,
                           prefetched_body=first_body if page_number == 1 else None, page_count=page_count)
        report.add("catch_up_jobs_listed", len(batch.job_ids))
    for part in (fetch_call_results(engine, client, task.id, None, zone, now, logger),
                 fetch_recordings(engine, client, task.id, None, now, logger),
                 create_follow_ups(engine, llm, task.id, None, now, logger, threads)):
        report.merge(part)
    return report


def mark_unmatched_leads(engine: Engine, task_id: int, now: datetime) -> int:
    with repo.write_transaction(engine) as conn:
        return repo.mark_unmatched_leads_failed(conn, task_id, now)


def advance_task_state(engine: Engine, task_id: int, now: datetime) -> tuple[int | None, int | None]:
    """Evaluate SPEC §4 for one task and move it up (2 → 3 → 4 possibly at once). Returns the
    task's type before and after; (None, None) when the task does not exist."""
    with repo.write_transaction(engine) as conn:
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
