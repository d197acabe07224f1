"""Step 3: call results for the leads whose status is empty or not yet terminal."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Engine
from sqlalchemy.exc import DataError

from call_pipeline.clients.outboundbot import (
    LIST_JOBS_MAX_IDS,
    OutboundBotError,
    split_for_list_jobs,
)
from call_pipeline.crm import repository as repo
from call_pipeline.crm.database import ensure_pipeline_tables
from call_pipeline.domain.call_results import NON_TERMINAL_JOB_STATUSES, CallResult, parse_list_jobs_body
from call_pipeline.domain.counts import StepReport
from call_pipeline.settings import settings
from call_pipeline.steps._concurrent import call_and_write
from call_pipeline.steps.batch import PageBatch
from call_pipeline.steps.env import StepEnv
from call_pipeline.steps.give_up import UnitLedger

# Jobs' results written per transaction, at most (in whole ListJobs answers of up to 99 jobs):
# more at once would hold too many transcripts in memory.
STORED_TOGETHER = 500
# ListJobs calls of a batch in flight at once: one after the other, a batch of 1,000 jobs waited
# for 11 round trips before its recordings and follow-ups could start.
LIST_JOBS_IN_FLIGHT = 4
# Jobs named in one log line; the rest are counted.
NAMED_PER_LINE = 20


def update_call_results(env: StepEnv, batch: PageBatch) -> StepReport:
    """ListJobs for the batch's jobs that still need a result, in calls of as many ids as
    ListJobs takes, LIST_JOBS_IN_FLIGHT at a time. A failed call fails its jobs only. With a
    ledger, a job that ListJobs does not return counts as a failed unit of its lead, and once
    given up its lead is concluded `Failed`."""
    engine, client, task_id, job_ids = env.engine, env.outboundbot, batch.task_id, batch.job_ids
    zone, now, logger, ledger = env.zone, env.clock(), env.logger, env.ledger
    report = StepReport()
    ensure_pipeline_tables(engine)
    with engine.connect() as conn:
        needed = repo.fetch_job_ids_needing_results(conn, task_id, job_ids, now=now,
                                                    transcript_grace_seconds=settings().transcript_grace_seconds)
    report.counts.jobs_queried = len(needed)
    calls = split_for_list_jobs(needed)
    # The same problem of many jobs (say 300 cancelled jobs never dialled) is one line naming
    # them, not 300 events in the run's log.
    jobs_with: dict[str, list[str]] = {}
    not_returned: list[str] = []
    returned: list[str] = []

    def fetch(ids: list[str]):
        try:
            return ids, client.list_jobs(ids), None
        except OutboundBotError as exc:
            return ids, None, exc

    def store(answers: list) -> None:
        results: list[CallResult] = []
        for ids, body, exc in answers:
            if exc is not None:
                report.fail(f"ListJobs for {len(ids)} job(s) starting {ids[0]}: {exc}")
                logger.error("task %s: ListJobs for %d job(s) failed: %s", task_id, len(ids), exc)
                continue
            parsed = parse_list_jobs_body(body, ids, zone)
            for problem in parsed.problems:
                logger.warning("task %s: %s", task_id, problem)
            for result in parsed.results:
                # A job still waiting to be dialled has no call attempts yet: expected, not a problem.
                waiting = result.call_status in NON_TERMINAL_JOB_STATUSES
                for problem in result.problems:
                    if waiting:
                        logger.debug("task %s job %s: %s", task_id, result.job_id, problem)
                    else:
                        jobs_with.setdefault(problem, []).append(result.job_id)
            returned.extend(result.job_id for result in parsed.results)
            if parsed.missing_job_ids:
                not_returned.extend(parsed.missing_job_ids)
                report.counts.jobs_not_returned += len(parsed.missing_job_ids)
                logger.warning("task %s: ListJobs did not return %d job(s) (queried again next run): %s", task_id,
                               len(parsed.missing_job_ids), ", ".join(parsed.missing_job_ids[:10]))
            results.extend(parsed.results)
        if results:
            _store(engine, task_id, results, now, report, logger)

    # A few calls in flight (the shared rate limit bounds them), their answers stored on this
    # thread as they come, up to STORED_TOGETHER jobs a transaction.
    call_and_write(calls, fetch, store, threads=LIST_JOBS_IN_FLIGHT,
                   batch_size=max(1, STORED_TOGETHER // LIST_JOBS_MAX_IDS), max_wait_s=1.0,
                   name="call-pipeline-list-jobs", stop=env.stop)
    for problem, jobs in jobs_with.items():
        logger.warning("task %s: %s: %s", task_id, problem, named_jobs(jobs))
    if ledger is not None and (not_returned or returned):
        _count_jobs_not_returned(engine, ledger, task_id, not_returned, returned, now, report, logger)
    return report


def _count_jobs_not_returned(engine: Engine, ledger: UnitLedger, task_id: int, not_returned: list[str],
                             returned: list[str], now: datetime, report: StepReport, logger: logging.Logger) -> None:
    if not not_returned and not ledger.held(task_id, repo.UNIT_CALL_RESULT):
        return  # nothing failed now or before: nothing to count or clear
    with engine.connect() as conn:
        rows = repo.lead_rows_of_jobs(conn, task_id, [*not_returned, *returned])
    failed = {rows[job_id]: f"ListJobs did not return job {job_id}" for job_id in not_returned if job_id in rows}
    given_up = ledger.record(task_id, repo.UNIT_CALL_RESULT, failed,
                             [rows[job_id] for job_id in returned if job_id in rows], now)
    if not given_up:
        return
    with repo.write_transaction(engine) as conn:
        concluded = repo.conclude_jobs_failed(conn, task_id, given_up, now)
    jobs = [job_id for job_id in not_returned if rows.get(job_id) in set(given_up)]
    report.counts.units_given_up += len(given_up)
    report.counts.jobs_concluded_failed += concluded
    logger.warning("task %s: ListJobs did not return %s in %d runs: given up, concluded Failed", task_id,
                   named_jobs(jobs), ledger.max_attempts)


def named_jobs(job_ids: Sequence[str], limit: int = NAMED_PER_LINE) -> str:
    """"job A, job B and 3 more job(s)": each id after "job ", as every other log line names a job."""
    named = ", ".join(f"job {job_id}" for job_id in job_ids[:limit])
    return named + (f" and {len(job_ids) - limit} more job(s)" if len(job_ids) > limit else "")


def _store(engine: Engine, task_id: int, results: list[CallResult], now: datetime, report: StepReport,
           logger: logging.Logger) -> None:
    try:
        with repo.write_transaction(engine) as conn:
            report.counts.results_stored += repo.store_call_results(conn, task_id, results, now)
    except DataError:
        # A value the CRM's column cannot hold (say a status longer than 32 characters) fails
        # the whole bulk write: store the batch lead by lead, so that only that lead is left out.
        for result in results:
            try:
                with repo.write_transaction(engine) as conn:
                    report.counts.results_stored += repo.store_call_results(conn, task_id, [result], now)
            except DataError as exc:
                report.counts.results_not_stored += 1
                logger.warning("task %s job %s: call results not stored, the CRM refused them (queried again "
                               "next run): %s", task_id, result.job_id, getattr(exc, "orig", exc))
    report.counts.statuses.update(result.call_status or "(none)" for result in results)
