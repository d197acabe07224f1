"""Step 4: the recording of each succeeded call that has none yet."""

from __future__ import annotations

from dataclasses import dataclass

from call_pipeline.clients.outboundbot import OutboundBotError
from call_pipeline.clients.recording_store import ArchiveError, recording_stem
from call_pipeline.crm import repository as repo
from call_pipeline.domain.counts import StepReport
from call_pipeline.steps._concurrent import call_and_write
from call_pipeline.steps.batch import PageBatch
from call_pipeline.steps.env import StepEnv

# DownloadRecording calls in flight in one step. The shared rate limiter is what bounds them
# across steps and runs; a few threads keep the limit's slots busy at the cloud's latency.
RECORDING_THREADS = 8
WRITTEN_TOGETHER = 100
WRITE_AT_LEAST_EVERY_S = 2.0


@dataclass(frozen=True)
class _Download:
    lead: repo.LeadForRecording
    url: str | None = None
    error: Exception | None = None
    archived_bytes: int | None = None  # None: not archived now (no archive, or already there)
    already_archived: bool = False
    renewed: bool = False


def save_recordings(env: StepEnv, batch: PageBatch, *, threads: int = RECORDING_THREADS) -> StepReport:
    """DownloadRecording for the batch's succeeded calls without a recording, written as they
    come. With an archive, the recording behind the signed URL is stored there and the CRM
    gets the archive's URL; one already archived is not fetched again (nor is DownloadRecording
    called), and a signed URL that expired before it was fetched is asked for anew, once.
    A failed download or archive leaves `recording_url` empty with a warning and is a failed
    unit (the run must not conclude the task with a recording missing: a task at 4 is not run
    again). An invalid call task id is skipped with a warning and does not fail the step. With a
    ledger, a recording that failed in `ledger.max_attempts` runs is given up: it stays empty,
    is asked for no more, and no longer fails the step."""
    engine, client, task_id, job_ids = env.engine, env.outboundbot, batch.task_id, batch.job_ids
    clock, logger, archive, ledger = env.clock, env.logger, env.archive, env.ledger
    report = StepReport()
    failed: dict[int, tuple[repo.LeadForRecording, str]] = {}
    saved: list[int] = []
    with engine.connect() as conn:
        leads = repo.fetch_leads_needing_recording(conn, task_id, job_ids)

    def download(lead: repo.LeadForRecording) -> _Download:
        if archive is None:
            try:
                return _Download(lead, url=client.download_recording(lead.call_task_id))
            except OutboundBotError as exc:
                return _Download(lead, error=exc)
        stem = recording_stem(task_id, lead.call_task_id)
        try:
            key = archive.archived_key(stem)
            if key is not None:
                return _Download(lead, url=archive.crm_url(key), already_archived=True)
        except Exception as exc:  # the store unreachable: this lead fails, the next run retries it
            return _Download(lead, error=ArchiveError(f"the archive could not be read: {type(exc).__name__}: {exc}"))
        renewed = False
        for attempt in (1, 2):
            try:
                signed_url = client.download_recording(lead.call_task_id)
            except OutboundBotError as exc:
                return _Download(lead, error=exc)
            try:
                url, size = archive.archive(signed_url, stem)
                return _Download(lead, url=url, archived_bytes=size, renewed=renewed)
            except ArchiveError as exc:
                if exc.expired and attempt == 1:
                    logger.info("task %s job %s: the recording's signed URL had expired; asking for a new one",
                                task_id, lead.call_job_id)
                    renewed = True
                    continue
                return _Download(lead, error=exc)
            except Exception as exc:  # the store refused the upload
                return _Download(lead, error=ArchiveError(f"archiving failed: {type(exc).__name__}: {exc}"))
        raise AssertionError("unreachable")

    def write(downloads: list[_Download]) -> None:
        fetched = []
        for item in downloads:
            if item.url is not None:
                fetched.append((item.lead.lead_row_id, item.url))
                counts = report.counts
                counts.recordings_already_archived += item.already_archived
                counts.recording_urls_renewed += item.renewed
                if item.archived_bytes is not None:
                    counts.recordings_archived += 1
                    counts.recording_bytes_archived += item.archived_bytes
            elif isinstance(item.error, OutboundBotError) and item.error.invalid_task_id:
                report.counts.recordings_invalid_task_id += 1
                logger.warning("task %s job %s: recording skipped, invalid call task id %s: %s",
                               task_id, item.lead.call_job_id, item.lead.call_task_id, item.error)
            else:
                report.counts.recordings_failed += 1
                failed[item.lead.lead_row_id] = (item.lead, str(item.error))
                logger.warning("task %s job %s: recording not fetched (retried next run): %s",
                               task_id, item.lead.call_job_id, item.error)
        if fetched:
            with repo.write_transaction(engine) as conn:
                report.counts.recordings_fetched += repo.store_recording_urls(conn, fetched, clock())
            saved.extend(lead_row_id for lead_row_id, _ in fetched)

    call_and_write(leads, download, write, threads=threads, batch_size=WRITTEN_TOGETHER,
                   max_wait_s=WRITE_AT_LEAST_EVERY_S, name="call-pipeline-recordings", stop=env.stop)
    given_up: set[int] = set()
    if ledger is not None:
        given_up = set(ledger.record(task_id, repo.UNIT_RECORDING,
                                     {row: error for row, (_, error) in failed.items()}, saved, clock()))
    for lead_row_id, (lead, error) in failed.items():
        if lead_row_id in given_up:
            report.counts.units_given_up += 1
            logger.warning("task %s job %s: recording failed in %d runs: given up, left empty (%s)",
                           task_id, lead.call_job_id, ledger.max_attempts if ledger else 0, error)
        else:
            report.fail(f"recording of job {lead.call_job_id}: {error}")
    return report
