"""The ops of `sync_call_task` and `advance_task_states`. Each is thin: it reads its inputs,
calls a step of `call_pipeline.steps`, and reports. Tags and pools carry the seed's Celery queues
so that the `dagster-celery` executor routes each op to its queue and pools bound each kind of
work across runs."""


from collections import Counter
from dataclasses import dataclass

import dagster as dg
from pydantic import Field

from call_pipeline import settings, steps
from call_pipeline.crm import repository as repo
from call_pipeline.domain.summary import render_run_summary
from call_pipeline.resources import CrmDatabase, DashScopeResource, OutboundBotResource

# The seed's Celery queues and priorities (higher runs first).
SYNC_QUEUE = {"dagster-celery/queue": "sync_queue", "dagster-celery/priority": "5"}
QUERY_QUEUE = {"dagster-celery/queue": "query_queue", "dagster-celery/priority": "6"}
DOWNLOAD_QUEUE = {"dagster-celery/queue": "download_queue", "dagster-celery/priority": "3"}
AI_QUEUE = {"dagster-celery/queue": "ai_queue", "dagster-celery/priority": "4"}

# The in-process executor runs the ready step with the highest `dagster/priority` first. Later
# steps of a page's chain rank higher, so that a page goes through steps 2 to 5 before the next
# page is matched (depth first): the first LLM calls start after one page, not after all of them.
CHAIN_PRIORITY = {step: {"dagster/priority": str(step)} for step in (2, 3, 4, 5)}

API_RETRY_POLICY = dg.RetryPolicy(
    max_retries=settings.OP_MAX_RETRIES,
    delay=settings.OP_RETRY_DELAY_SECONDS,
    backoff=dg.Backoff.EXPONENTIAL,
    jitter=dg.Jitter.PLUS_MINUS,
)


@dataclass(frozen=True)
class PageRequest:
    """A batch of `page_count` consecutive pages of the task's job group, from `page_number`."""

    task: repo.TaskRow
    page_number: int
    page_size: int
    page_count: int = 1


class PagingConfig(dg.Config):
    page_size: int = Field(default=settings.DEFAULT_PAGE_SIZE, ge=1,
                           description="ListJobsByGroup page size (CALL_PIPELINE_PAGE_SIZE).")
    pages_per_batch: int = Field(default=settings.DEFAULT_PAGES_PER_BATCH, ge=1,
                                 description="Pages whose jobs one mapped chain (steps 2-5) works on together "
                                             "(CALL_PIPELINE_PAGES_PER_BATCH).")


def _task_id_of(context: dg.OpExecutionContext) -> int:
    key = context.partition_key
    try:
        task_id = int(key)
    except (TypeError, ValueError):
        raise dg.Failure(description=f"partition key {key!r} is not a call task id", allow_retries=False) from None
    if task_id <= 0:
        raise dg.Failure(description=f"partition key {key!r} is not a call task id", allow_retries=False)
    return task_id


def _not_run(context: dg.OpExecutionContext) -> None:
    # See call_pipeline/io_managers.py: the batch's upstream step never ran in this lineage.
    context.log.warning(f"{context.op_handle}: the batch's earlier steps never ran in this run's lineage; "
                        "finish_page_work catches up on its work")
    return None


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
    mapped chain per batch of `pages_per_batch` pages, so that each batch's matching, results,
    recordings and follow-ups can start as soon as its pages are fetched."""
    # The first page's answer is not handed on: what steps pass each other is pickled into
    # Dagster's storage, and the customers' phones and names should not rest there.
    pages, _ = steps.count_job_pages(outboundbot.get_client(), task.job_group_id, config.page_size)
    batches = steps.batch_pages(pages, config.pages_per_batch)
    context.log.info(f"task {task.id}: {pages} page(s) of up to {config.page_size} jobs, in {len(batches)} "
                     f"batch(es) of up to {config.pages_per_batch} page(s)")
    for page_number, page_count in batches:
        last = page_number + page_count - 1
        yield dg.DynamicOutput(
            PageRequest(task, page_number, config.page_size, page_count),
            mapping_key=f"page_{page_number}" if page_count == 1 else f"pages_{page_number}_{last}",
        )


@dg.op(tags={**SYNC_QUEUE, **CHAIN_PRIORITY[2]}, pool="sync_queue", retry_policy=API_RETRY_POLICY)
def match_job_page(context: dg.OpExecutionContext, page: PageRequest, crm: CrmDatabase,
                   outboundbot: OutboundBotResource) -> steps.PageBatch:
    """Step 2 for one batch of pages: map its jobs to leads (one read, one bulk write)."""
    batch = steps.match_page(
        crm.engine, outboundbot.get_client(), page.task, page.page_number, page.page_size, crm.now(),
        context.log, page_count=page.page_count,
    )
    context.log.info(f"task {page.task.id} {batch.label}: {batch.match_counts}")
    return batch


@dg.op(tags={**QUERY_QUEUE, **CHAIN_PRIORITY[3]}, pool="query_queue", retry_policy=API_RETRY_POLICY)
def fetch_call_results(context: dg.OpExecutionContext, batch: steps.PageBatch | None, crm: CrmDatabase,
                       outboundbot: OutboundBotResource) -> steps.PageBatch | None:
    """Step 3 for the batch's jobs whose status is empty or not terminal."""
    if batch is None:
        return _not_run(context)
    report = steps.fetch_call_results(crm.engine, outboundbot.get_client(), batch.task_id, batch.job_ids,
                                      crm.zone, crm.now(), context.log)
    _fail_on(report, f"task {batch.task_id} {batch.label}: call results")
    return steps.PageBatch(batch.task_id, batch.page_number, batch.job_ids,
                           {**batch.match_counts, **report.counts}, batch.page_count)


@dg.op(tags={**DOWNLOAD_QUEUE, **CHAIN_PRIORITY[4]}, pool="download_queue", retry_policy=API_RETRY_POLICY)
def fetch_recordings(context: dg.OpExecutionContext, batch: steps.PageBatch | None, crm: CrmDatabase,
                     outboundbot: OutboundBotResource) -> steps.PageTicket | None:
    """Step 4 for the batch's succeeded calls without a recording. The downloads go to a shared
    pool and run while later batches are worked on; `finish_page_work` waits for them."""
    if batch is None:
        return _not_run(context)
    return steps.run_page_work(context.run_id).queue_recordings(
        crm.engine, outboundbot.get_client(), batch.task_id, batch.page_number, batch.job_ids, crm.now, context.log)


@dg.op(tags={**AI_QUEUE, **CHAIN_PRIORITY[5]}, pool="ai_queue", retry_policy=API_RETRY_POLICY)
def create_follow_ups(context: dg.OpExecutionContext, batch: steps.PageBatch | None, crm: CrmDatabase,
                      dashscope: DashScopeResource) -> steps.PageTicket | None:
    """Step 5 for the page's leads with a terminal status and no follow-up. Its leads go to the
    shared LLM pool, which stays full across pages, alongside step 4; `finish_page_work` waits
    for them. Waits first while many leads are still queued (back-pressure)."""
    if batch is None:
        return _not_run(context)
    ticket = steps.run_page_work(context.run_id).queue_follow_ups(
        crm.engine, dashscope.get_client(), batch.task_id, batch.page_number, batch.job_ids, crm.now,
        dashscope.max_concurrency, context.log)
    context.log.debug(f"task {batch.task_id} {batch.label}: {ticket.queued} follow-up(s) queued")
    return ticket


@dg.op(tags=SYNC_QUEUE, retry_policy=API_RETRY_POLICY)
def finish_page_work(context: dg.OpExecutionContext, task: repo.TaskRow,
                     recordings: list[steps.PageTicket | None], follow_ups: list[steps.PageTicket | None],
                     crm: CrmDatabase, outboundbot: OutboundBotResource, dashscope: DashScopeResource) -> dict:
    """After the last page: waits for the recordings and follow-ups that the page ops handed to
    the shared pools. A page whose work this process does not hold (a retry of this op, a
    re-execution from failure, a page op run in another process) is redone here from what the
    CRM still needs. Fails, once everything else is saved, if any lead or page failed, so that a
    retry or a rerun picks them up."""
    work = steps.run_page_work(context.run_id)

    def redo(ticket: steps.PageTicket) -> None:
        if ticket.kind == steps.RECORDINGS:
            work.queue_recordings(crm.engine, outboundbot.get_client(), ticket.task_id, ticket.page_number,
                                  ticket.job_ids, crm.now, context.log)
        else:
            work.queue_follow_ups(crm.engine, dashscope.get_client(), ticket.task_id, ticket.page_number,
                                  ticket.job_ids, crm.now, dashscope.max_concurrency, context.log)

    try:
        report = work.finish([t for t in (*recordings, *follow_ups) if t is not None], redo)
    finally:
        steps.forget_run_page_work(context.run_id)
    if context.run.parent_run_id:
        # A re-execution skips the parent's mapped steps that never started (see catch_up_task).
        context.log.info(f"task {task.id}: re-execution of run {context.run.parent_run_id}: "
                         "catching up on every page of the job group")
        report.merge(steps.catch_up_task(crm.engine, outboundbot.get_client(), dashscope.get_client(), task,
                                         settings.DEFAULT_PAGE_SIZE, crm.zone, crm.now(), context.log,
                                         threads=dashscope.max_concurrency,
                                         pages_per_batch=settings.DEFAULT_PAGES_PER_BATCH))
    _fail_on(report, f"task {task.id}: recordings and follow-ups")
    return dict(report.counts)


@dg.failure_hook
def finish_page_work_on_failure(context: dg.HookContext) -> None:
    """A step failed for good, so `finish_page_work` will not run: wait for the run's queued
    recordings and follow-ups here, and have its remaining page ops work inline, so that no work
    outlives the run (the next run or a re-execution redoes whatever failed)."""
    steps.drain_run_page_work(context.run_id)


@dg.op(tags=SYNC_QUEUE)
def mark_unmatched_leads(context: dg.OpExecutionContext, task: repo.TaskRow,
                         batches: list[steps.PageBatch | None], page_work: dict, crm: CrmDatabase) -> dict:
    """After the last page: leads that should have a job and have none are marked Failed
    (provisionally: a later run that matches them clears it)."""
    marked = steps.mark_unmatched_leads(crm.engine, task.id, crm.now())
    if marked:
        context.log.warning(f"task {task.id}: {marked} lead(s) matched no job and are marked Failed for now")
    batches = [b for b in batches if b is not None]
    totals: Counter = Counter()
    for part in [*(b.match_counts for b in batches), page_work]:
        totals.update({k: v for k, v in part.items() if isinstance(v, int)})
    totals["unmatched_marked_failed"] += marked
    totals["pages"] = sum(b.page_count for b in batches)
    totals["batches"] = len(batches)
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


def last_sync_run_status(instance: dg.DagsterInstance, task_id: int) -> dg.DagsterRunStatus | None:
    runs = instance.get_runs(
        filters=dg.RunsFilter(job_name="sync_call_task", tags={"dagster/partition": str(task_id)}), limit=1
    )
    return runs[0].status if runs else None


# A task whose last sync run did not finish may have pages never matched: concluding it now would
# lose their leads for good, since a task at 4 is never run again. Its next run evaluates it.
UNFINISHED_RUN_STATUSES = {
    dg.DagsterRunStatus.FAILURE,
    dg.DagsterRunStatus.CANCELED,
    dg.DagsterRunStatus.CANCELING,
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
}


@dg.op(tags=SYNC_QUEUE)
def advance_all_task_states(context: dg.OpExecutionContext, crm: CrmDatabase) -> dict:
    """For the schedule: evaluate every task at 2 or 3, whether or not a run came by lately,
    except a task whose last sync run failed or is still under way (that run, or its rerun,
    evaluates the task when it completes)."""
    with crm.engine.connect() as conn:
        tasks = repo.fetch_tasks_in_progress(conn)
    moved, held = {}, {}
    for task in tasks:
        status = last_sync_run_status(context.instance, task.id)
        if status in UNFINISHED_RUN_STATUSES:
            held[str(task.id)] = status.value
            continue
        before, after = steps.advance_task_state(crm.engine, task.id, crm.now())
        if after is not None and after != before:
            moved[str(task.id)] = f"{before} -> {after}"
    if held:
        context.log.info(f"not evaluated, their last sync run has not completed: {held}")
    context.log.info(f"evaluated {len(tasks) - len(held)} task(s); moved: {moved or 'none'}")
    context.add_output_metadata({"tasks_evaluated": len(tasks) - len(held), "moved": dg.MetadataValue.json(moved),
                                 "held": dg.MetadataValue.json(held)})
    return moved
