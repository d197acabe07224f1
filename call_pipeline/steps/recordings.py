"""Step 4: the recording of each succeeded call that has none yet."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine

from call_pipeline.clients.outboundbot import OutboundBotClient, OutboundBotError
from call_pipeline.crm import repository as repo
from call_pipeline.domain.counts import StepReport
from call_pipeline.steps._concurrent import call_and_write

log = logging.getLogger(__name__)

# DownloadRecording calls in flight in one step. The shared rate limiter is what bounds them
# across steps and runs; a few threads keep the limit's slots busy at the cloud's latency.
RECORDING_THREADS = 8
WRITTEN_TOGETHER = 100
WRITE_AT_LEAST_EVERY_S = 2.0


@dataclass(frozen=True)
class _Download:
    lead: repo.LeadForRecording
    url: str | None = None
    error: OutboundBotError | None = None


def save_recordings(engine: Engine, client: OutboundBotClient, task_id: int, job_ids: Sequence[str] | None,
                    clock: Callable[[], datetime], logger: logging.Logger | None = None,
                    threads: int = RECORDING_THREADS) -> StepReport:
    """DownloadRecording for the batch's succeeded calls without a recording, written as they
    come. A failed download leaves `recording_url` empty with a warning and is a failed unit (the
    run must not conclude the task with a recording missing: a task at 4 is not run again). An
    invalid call task id is skipped with a warning and does not fail the step."""
    logger = logger or log
    report = StepReport()
    with engine.connect() as conn:
        leads = repo.fetch_leads_needing_recording(conn, task_id, job_ids)

    def download(lead: repo.LeadForRecording) -> _Download:
        try:
            return _Download(lead, url=client.download_recording(lead.call_task_id))
        except OutboundBotError as exc:
            return _Download(lead, error=exc)

    def write(downloads: list[_Download]) -> None:
        fetched = []
        for item in downloads:
            if item.url is not None:
                fetched.append((item.lead.lead_row_id, item.url))
            elif item.error is not None and item.error.invalid_task_id:
                report.counts.recordings_invalid_task_id += 1
                logger.warning("task %s job %s: recording skipped, invalid call task id %s: %s",
                               task_id, item.lead.call_job_id, item.lead.call_task_id, item.error)
            else:
                report.counts.recordings_failed += 1
                report.fail(f"recording of job {item.lead.call_job_id}: {item.error}")
                logger.warning("task %s job %s: recording not fetched (retried next run): %s",
                               task_id, item.lead.call_job_id, item.error)
        if fetched:
            with repo.write_transaction(engine) as conn:
                report.counts.recordings_fetched += repo.store_recording_urls(conn, fetched, clock())

    call_and_write(leads, download, write, threads=threads, batch_size=WRITTEN_TOGETHER,
                   max_wait_s=WRITE_AT_LEAST_EVERY_S, name="call-pipeline-recordings")
    return report
