"""The ops of `sync_call_task` and `advance_task_states`. Each is thin: it reads its inputs,
calls a step of `call_pipeline.steps`, and reports. Tags and pools carry the seed's Celery queues
so that the `dagster-celery` executor routes each op to its queue and pools bound each kind of
work across runs."""


from collections import Counter
from dataclasses import dataclass

import dagster as dg

from call_pipeline import settings, steps
from call_pipeline.crm import repository as repo
from call_pipeline.domain.summary import render_run_summary
from call_pipeline.resources import CrmDatabase, DashScopeResource, OutboundBotResource

# The seed's Celery queues and priorities (higher runs first).
SYNC_QUEUE = {"dagster-celery/queue": "sync_queue", "dagster-celery/priority": "5"}
QUERY_QUEUE = {"dagster-celery/queue": "query_queue", "dagster-celery/priority": "6"}
DOWNLOAD_QUEUE = {"dagster-celery/queue": "download_queue", "dagster-celery/priority": "3"}
AI_QUEUE = {"dagster-celery/queue": "ai_queue", "dagster-celery/priority": "4"}

API_RETRY_POLICY = dg.RetryPolicy(
    max_retries=settings.OP_MAX_RETRIES,
    delay=settings.OP_RETRY_DELAY_SECONDS,
    backoff=dg.Backoff.EXPONENTIAL,
    jitter=dg.Jitter.PLUS_MINUS,
)


@dataclass(frozen=True)
class PageRequest:
    task: repo.TaskRow
    page_number: int
    page_size: int
    prefetched_body: dict | None = None


class PagingConfig(dg.Config):
    page_size: int = settings.DEFAULT_PAGE_SIZE


def _task_id_of(context: dg.OpExecutionContext) -> int:
    key = context.partition_key
    try:
        task_id = int(key)
    except (TypeError, ValueError):
        raise dg.Failure(description=f"partition key {key!r} is not a call task id", allow_retries=False) from None
    if task_id <= 0:
        raise dg.Failure(description=f"partition key {key!r} is not a call task id", allow_retries=False)
    return task_id


def _fail_on(report: steps.StepReport, what: str) -> None:
    try:
        report.raise_if_failed(what)
    except steps.StepFailed as exc:
        raise dg.Failure(description=str(exc)) from None


@dg.op(out=dg.Out(repo.TaskRow, is_required=False), tags=SYNC_QUEUE)
def load_task(context: dg.OpExecutionContext, crm: CrmDatabase):
    """Step 1 for this run's task. Runs launched by hand or by GraphQL are not validated against
    the partition set, so the task is checked here; one that no longer qualifies ends the run
    cleanly (every later step is skipped) with a log line saying why."""
    task_id = _task_id_of(context)
    with crm.engine.connect() as conn:
        task = repo.fetch_task(conn, task_id)
    if task is None:
        context.log.warning(f"task {task_id}: no such call task in the CRM; nothing to do")
        return
    if task.task_type not in repo.ACTIVE_TASK_TYPES:
        context.log.info(f"task {task_id}: task_type is {task.task_type}, not 2 or 3; nothing to do")
        return
    if not (task.job_group_id or "").strip():
        context.log.warning(f"task {task_id}: no job_group_id; nothing to do")
        return
    context.log.info(f"task {task_id} ({task.task_name}): job group {task.job_group_id}, task_type {task.task_type}")
    yield dg.Output(task)


@dg.op(out=dg.DynamicOut(PageRequest), tags=SYNC_QUEUE, pool="sync_queue", retry_policy=API_RETRY_POLICY)
def list_job_pages(context: dg.OpExecutionContext, config: PagingConfig, task: repo.TaskRow,
                   outboundbot: OutboundBotResource):
    """Fans out over the job group's pages: one ListJobsByGroup call for TotalCount, then one
    mapped chain per page, so that each page's matching, results, recordings and follow-ups can
    start as soon as that page is fetched."""
    pages, first_body = steps.count_job_pages(outboundbot.get_client(), task.job_group_id, config.page_size)
    context.log.info(f"task {task.id}: {pages} page(s) of up to {config.page_size} jobs")
    for page_number in range(1, pages + 1):
        yield dg.DynamicOutput(
            PageRequest(task, page_number, config.page_size, first_body if page_number == 1 else None),
            mapping_key=f"page_{page_number}",
        )


@dg.op(tags=SYNC_QUEUE, pool="sync_queue", retry_policy=API_RETRY_POLICY)
def match_job_page(context: dg.OpExecutionContext, page: PageRequest, crm: CrmDatabase,
                   outboundbot: OutboundBotResource) -> steps.PageBatch:
    """Step 2 for one page: map its jobs to leads (one read, one bulk write)."""
    batch = steps.match_page(
        crm.engine, outboundbot.get_client(), page.task, page.page_number, page.page_size, crm.now(),
        context.log, prefetched_body=page.prefetched_body,
    )
    context.log.info(f"task {page.task.id} page {page.page_number}: {batch.match_counts}")
    return batch


@dg.op(tags=QUERY_QUEUE, pool="query_queue", retry_policy=API_RETRY_POLICY)
def fetch_call_results(context: dg.OpExecutionContext, batch: steps.PageBatch, crm: CrmDatabase,
                       outboundbot: OutboundBotResource) -> steps.PageBatch:
    """Step 3 for the page's jobs whose status is empty or not terminal."""
    report = steps.fetch_call_results(crm.engine, outboundbot.get_client(), batch.task_id, batch.job_ids,
                                      crm.zone, crm.now(), context.log)
    _fail_on(report, f"task {batch.task_id} page {batch.page_number}: call results")
    return steps.PageBatch(batch.task_id, batch.page_number, batch.job_ids,
                           {**batch.match_counts, **report.counts})


@dg.op(tags=DOWNLOAD_QUEUE, pool="download_queue", retry_policy=API_RETRY_POLICY)
def fetch_recordings(context: dg.OpExecutionContext, batch: steps.PageBatch, crm: CrmDatabase,
                     outboundbot: OutboundBotResource) -> dict:
    """Step 4 for the page's succeeded calls without a recording."""
    report = steps.fetch_recordings(crm.engine, outboundbot.get_client(), batch.task_id, batch.job_ids,
                                    crm.now(), context.log)
    return dict(report.counts)


@dg.op(tags=AI_QUEUE, pool="ai_queue", retry_policy=API_RETRY_POLICY)
def create_follow_ups(context: dg.OpExecutionContext, batch: steps.PageBatch, crm: CrmDatabase,
                      dashscope: DashScopeResource) -> dict:
    """Step 5 for the page's leads with a terminal status and no follow-up."""
    client = dashscope.get_client()
    report = steps.create_follow_ups(crm.engine, client, batch.task_id, batch.job_ids, crm.now(), context.log,
                                     threads=dashscope.max_concurrency)
    _fail_on(report, f"task {batch.task_id} page {batch.page_number}: follow-ups")
    return dict(report.counts)


@dg.op(tags=SYNC_QUEUE)
def mark_unmatched_leads(context: dg.OpExecutionContext, task: repo.TaskRow, batches: list[steps.PageBatch],
                         recordings: list[dict], follow_ups: list[dict], crm: CrmDatabase) -> dict:
    """After the last page: leads that should have a job and have none are marked Failed
    (provisionally: a later run that matches them clears it)."""
    marked = steps.mark_unmatched_leads(crm.engine, task.id, crm.now())
    if marked:
        context.log.warning(f"task {task.id}: {marked} lead(s) matched no job and are marked Failed for now")
    totals: Counter = Counter()
    for part in [*(b.match_counts for b in batches), *recordings, *follow_ups]:
        totals.update({k: v for k, v in part.items() if isinstance(v, int)})
    totals["unmatched_marked_failed"] += marked
    totals["pages"] = len(batches)
    return dict(totals)


def summary_stats(totals: dict) -> dict:
    """The run's flat step counters, shaped for `render_run_summary`."""
    def prefixed(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in totals.items() if k.startswith(prefix)}

    match_keys = ("reference_id", "legacy_reference_id", "phone", "already_matched", "unmatched_jobs")
    return {
        "jobs_listed": totals.get("jobs_listed", 0),
        "match_counts": {k: totals.get(k, 0) for k in match_keys},
        "unmatched_leads_failed": totals.get("unmatched_marked_failed", 0),
        "recordings_fetched": totals.get("recordings_fetched", 0),
        "recordings_failed": totals.get("recordings_failed", 0) + totals.get("recordings_invalid_task_id", 0),
        "follow_ups_by_verdict": {int(k): v for k, v in prefixed("follow_ups:").items()},
        "follow_ups_by_source": prefixed("source:"),
    }


@dg.op(tags=SYNC_QUEUE)
def advance_task_state(context: dg.OpExecutionContext, task: repo.TaskRow, totals: dict, crm: CrmDatabase) -> int:
    """Evaluate the task's state (SPEC §4) and attach the run's summary."""
    before, after = steps.advance_task_state(crm.engine, task.id, crm.now())
    with crm.engine.connect() as conn:
        statuses = repo.count_statuses(conn, task.id)
    summary = render_run_summary({**summary_stats(totals), "statuses": statuses, "task_type_before": before,
                                  "task_type_after": after, "task_id": task.id})
    context.add_output_metadata({
        "summary": dg.MetadataValue.md(summary),
        "task_type_before": before,
        "task_type_after": after,
    })
    context.log.info(f"task {task.id}: task_type {before} -> {after}")
    return after if after is not None else -1


@dg.op(tags=SYNC_QUEUE)
def advance_all_task_states(context: dg.OpExecutionContext, crm: CrmDatabase) -> dict:
    """For the schedule: evaluate every task at 2 or 3, whether or not a run came by lately."""
    with crm.engine.connect() as conn:
        tasks = repo.fetch_tasks_in_progress(conn)
    moved = {}
    for task in tasks:
        before, after = steps.advance_task_state(crm.engine, task.id, crm.now())
        if after is not None and after != before:
            moved[str(task.id)] = f"{before} -> {after}"
    context.log.info(f"evaluated {len(tasks)} task(s); moved: {moved or 'none'}")
    context.add_output_metadata({"tasks_evaluated": len(tasks), "moved": dg.MetadataValue.json(moved)})
    return moved
