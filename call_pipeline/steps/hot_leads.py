"""Hot leads: each lead the AI marked interested is posted once to CALL_PIPELINE_HOT_LEAD_WEBHOOK_URL,
right after step 5 wrote its follow-up (called by `create_follow_ups` for its batch, and by
`advance_task_state` for the whole task, which posts again what an earlier run failed to post).

Claim, then post: a lead's row in `call_pipeline_hot_leads_posted` is inserted (its primary key
makes one winner among concurrent runs) before its post, marked posted after it, and deleted when
the post failed, so that a later run posts it. So a lead is posted at most once, never twice,
whatever runs go at once; the price is that a process killed during a post leaves that lead
claimed and unposted (its row has no `posted_time`), and it is not posted again. Posting first and
recording after would post a lead twice when two runs meet it at once, and again after every
crash between the post and the record.

A failed post never fails the follow-up unit: it is a warning and a count in the run's summary.
After one failure the rest of the call's leads are left for a later run: a webhook that is down
would otherwise hold the op for its retries on every lead.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from call_pipeline.clients.webhook import post_chat_message
from call_pipeline.crm import repository as repo
from call_pipeline.crm.database import ensure_pipeline_tables
from call_pipeline.domain.alerts import hot_lead, hot_lead_payload
from call_pipeline.domain.counts import StepReport
from call_pipeline.settings import settings
from call_pipeline.steps._concurrent import call_and_write
from call_pipeline.steps.batch import PageBatch
from call_pipeline.steps.env import StepEnv

# Posts in flight at once: chat webhooks take a few per second.
POST_THREADS = 4


@dataclass(frozen=True)
class _Post:
    lead: repo.HotLeadRow
    outcome: str  # "posted" | "failed" | "claimed_elsewhere" | "not_tried"
    error: str | None = None


def post_batch_hot_leads(env: StepEnv, batch: PageBatch) -> StepReport:
    """`post_hot_leads` for the batch's jobs: what the follow-ups' op does after its step."""
    return post_hot_leads(env, batch.task_id, batch.job_ids)


def post_hot_leads(env: StepEnv, task_id: int, job_ids: Sequence[str] | None = None, *, url: str | None = None,
                   fmt: str | None = None) -> StepReport:
    """Posts the task's interested leads (of `job_ids`; None: every job) that no run has posted
    yet. Without a webhook (CALL_PIPELINE_HOT_LEAD_WEBHOOK_URL unset) it does nothing. Never
    raises: whatever goes wrong is a warning and a count, the lead is posted by a later run."""
    engine, clock, logger = env.engine, env.clock, env.logger
    url = url if url is not None else settings().hot_lead_webhook_url
    fmt = fmt or settings().alert_format
    report = StepReport()
    if not url:
        return report
    try:
        ensure_pipeline_tables(engine)
        with engine.connect() as conn:
            leads = repo.fetch_hot_leads_to_post(conn, task_id, job_ids)
    except Exception as exc:  # the follow-ups are written; the posts wait for a later run
        logger.warning("task %s: hot leads not posted this time (tried again next run): %s: %s",
                       task_id, type(exc).__name__, exc)
        return report
    token = uuid.uuid4().hex
    stop = threading.Event()

    def post(lead: repo.HotLeadRow) -> _Post:
        if stop.is_set():
            return _Post(lead, "not_tried")
        try:
            with repo.write_transaction(engine) as conn:
                if not repo.claim_hot_lead(conn, lead.lead_row_id, lead.task_id, token, clock()):
                    return _Post(lead, "claimed_elsewhere")
        except Exception as exc:
            stop.set()
            return _Post(lead, "not_tried", f"{type(exc).__name__}: {exc}")
        try:
            post_chat_message(url, hot_lead_payload(
                hot_lead(lead.task_id, lead.task_name, lead.leads_id, lead.leads_remark, lead.next_follow_time,
                         lead.leads_phone), fmt))
        except Exception as exc:
            stop.set()
            try:
                with repo.write_transaction(engine) as conn:
                    repo.release_hot_lead(conn, lead.lead_row_id, token)
            except Exception as release_exc:
                return _Post(lead, "failed", f"{exc}; and its claim could not be released, so it will not be "
                                             f"posted again: {type(release_exc).__name__}: {release_exc}")
            return _Post(lead, "failed", str(exc))
        try:
            with repo.write_transaction(engine) as conn:
                repo.mark_hot_lead_posted(conn, lead.lead_row_id, token, clock())
        except Exception as exc:  # posted all the same; its claim keeps it from a second post
            logger.warning("task %s lead %s: posted, but not marked so: %s", task_id, lead.leads_id, exc)
        return _Post(lead, "posted")

    not_tried: list[int] = []

    def tally(posts: list[_Post]) -> None:
        for item in posts:
            if item.outcome == "posted":
                report.counts.hot_leads_posted += 1
            elif item.outcome == "failed":
                report.counts.hot_leads_not_posted += 1
                logger.warning("task %s lead %s: hot lead not posted (tried again next run): %s",
                               task_id, item.lead.leads_id, item.error)
            elif item.outcome == "not_tried":
                report.counts.hot_leads_not_posted += 1
                not_tried.append(item.lead.leads_id)
                if item.error:
                    logger.warning("task %s lead %s: hot lead not claimed (tried again next run): %s",
                                   task_id, item.lead.leads_id, item.error)

    call_and_write(leads, post, tally, threads=POST_THREADS, batch_size=100, max_wait_s=1.0,
                   name="call-pipeline-hot-leads", stop=env.stop)
    if not_tried:
        logger.warning("task %s: %d hot lead(s) left for a later run after a failed post: leads %s%s", task_id,
                       len(not_tried), ", ".join(map(str, not_tried[:20])), " …" if len(not_tried) > 20 else "")
    if report.counts.hot_leads_posted:
        logger.info("task %s: %d hot lead(s) posted", task_id, report.counts.hot_leads_posted)
    return report
