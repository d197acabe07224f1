"""The batches of a run that no run of its lineage completed, done by the op after `.collect()`.

Dagster re-executes from failure the failed and interrupted steps and what follows them, but not
the mapped steps that never started (a run whose process was killed): their batches would be left
out, their leads marked unmatched and the task concluded. The op after `.collect()` knows every
batch of the run (the fan-out's plan) and which ones came back complete; the others are done here,
with the run's own paging, several batches at once, through the same step functions as the ops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from zoneinfo import ZoneInfo

from sqlalchemy import Engine

from call_pipeline.clients.dashscope_llm import LlmClient
from call_pipeline.clients.outboundbot import OutboundBotClient
from call_pipeline.clients.recording_store import RecordingArchive
from call_pipeline.domain.counts import StepReport
from call_pipeline.steps.batch import BatchResult, PageRequest
from call_pipeline.steps.call_results import update_call_results
from call_pipeline.steps.follow_ups import write_follow_ups
from call_pipeline.steps.give_up import UnitLedger
from call_pipeline.steps.matching import match_jobs_of_pages
from call_pipeline.steps.recordings import save_recordings

# Batches caught up at once; each makes its own calls side by side within the shared limits.
BATCHES_AT_ONCE = 2


def incomplete_batches(plan: Sequence[PageRequest], recordings: Sequence[BatchResult | None],
                       follow_ups: Sequence[BatchResult | None]) -> list[PageRequest]:
    """The planned batches for which step 4 or step 5 has no result in this run's lineage."""
    recordings_done = {r.page_number for r in recordings if r is not None}
    follow_ups_done = {r.page_number for r in follow_ups if r is not None}
    return [request for request in plan
            if request.page_number not in recordings_done or request.page_number not in follow_ups_done]


def catch_up_batches(engine: Engine, client: OutboundBotClient, llm: LlmClient, requests: Sequence[PageRequest],
                     zone: ZoneInfo, clock: Callable[[], datetime], concurrency: int,
                     logger: logging.Logger, archive: RecordingArchive | None = None,
                     ledger: UnitLedger | None = None) -> StepReport:
    """Steps 2 to 5 for each batch in `requests`, doing only what the CRM still needs (every
    write is guarded, so redoing a batch that was partly done is safe)."""

    def one_batch(request: PageRequest) -> StepReport:
        report = StepReport()
        batch = match_jobs_of_pages(engine, client, request, clock(), logger)
        report.counts = report.counts + batch.counts
        report.merge(update_call_results(engine, client, batch.task_id, batch.job_ids, zone, clock(), logger,
                                         ledger=ledger))
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="call-pipeline-catch-up") as pool:
            recordings = pool.submit(save_recordings, engine, client, batch.task_id, batch.job_ids, clock, logger,
                                     archive=archive, ledger=ledger)
            follow_ups = pool.submit(write_follow_ups, engine, llm, batch.task_id, batch.job_ids, clock,
                                     concurrency, logger, ledger=ledger)
            report.merge(recordings.result())
            report.merge(follow_ups.result())
        report.counts.batches_caught_up += 1
        return report

    total = StepReport()
    with ThreadPoolExecutor(max_workers=max(1, min(BATCHES_AT_ONCE, len(requests))),
                            thread_name_prefix="call-pipeline-catch-up") as pool:
        for report in pool.map(one_batch, requests):
            total.merge(report)
    return total
