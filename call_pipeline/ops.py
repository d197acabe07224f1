"""The ops of `sync_call_task` and `advance_task_states`. Each is thin: it reads its inputs,
calls a step of `call_pipeline.steps`, and reports; it returns only when its work is written.
The ops of the batch steps after matching are built from their list (steps/batch_steps.py,
`batch_op`). Tags and pools carry the design's Celery queues (queues.py) so that the
`dagster-celery` executor routes each op to its queue and pools bound each kind of work across
runs."""


import os
import re
from functools import partial

import dagster as dg
from pydantic import Field

from call_pipeline import queues
from call_pipeline.clients.outboundbot import OutboundBotError
from call_pipeline.clients.webhook import post_json
from call_pipeline.crm import repository as repo
from call_pipeline.domain.alerts import Alert, alert_payload, scrub
from call_pipeline.domain.counts import StepCounts, StepReport
from call_pipeline.domain.job_groups import parse_job_group
from call_pipeline.domain.paging import group_jobs_of_progress_tag, needs_paging
from call_pipeline.domain.summary import describe_given_up, render_run_summary
from call_pipeline.domain.task_state import TASK_FOLLOW_UP_DONE
from call_pipeline.queues import celery_tags
from call_pipeline.resources import (
    SECRET_VARIABLES,
    CrmDatabase,
    DashScopeResource,
    OutboundBotResource,
    RecordingArchiveResource,
)
from call_pipeline.run_status import UNFINISHED_RUN_STATUSES, last_sync_run_status
from call_pipeline.run_worker import raise_if_canceling
from call_pipeline.settings import settings
from call_pipeline.steps.batch import BatchResult, PageBatch, PageRequest
from call_pipeline.steps.batch_steps import BATCH_STEPS, BatchStep, last_steps
from call_pipeline.steps.catch_up import catch_up_batches, incomplete_batches
from call_pipeline.steps.env import StepEnv
from call_pipeline.steps.give_up import UnitLedger
from call_pipeline.steps.hot_leads import post_hot_leads
from call_pipeline.steps.matching import match_jobs_of_pages
from call_pipeline.steps.paging import plan_batches, plan_work_batches
from call_pipeline.steps.task_state import evaluate_task_state, fail_unmatched_leads

# The tag of runs that the late-jobs sensor requests for a task at 4 (its group grew).
LATE_JOBS_TAG = "call_pipeline/late_jobs"

# The design's Celery queues and priorities (higher runs first).
SYNC_TAGS = celery_tags(queues.SYNC_QUEUE)


def chain_priority(step_number: int) -> dict[str, str]:
    """Executors start the ready step with the highest `dagster/priority` first. Later steps of a
    batch's chain rank higher, so that a batch goes through all its steps before the next batch
    is matched (depth first): the first recordings and LLM calls start after one batch, not all."""
    return {"dagster/priority": str(step_number)}


def api_retry_policy() -> dg.RetryPolicy:
    """The retries of an op that calls a cloud, from CALL_PIPELINE_OP_MAX_RETRIES and
    CALL_PIPELINE_OP_RETRY_DELAY_SECONDS as they are when the ops are defined."""
    return dg.RetryPolicy(max_retries=settings().op_max_retries, delay=settings().op_retry_delay_seconds,
                          backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)


class PagingConfig(dg.Config):
    page_size: int = Field(default=settings().page_size, ge=1,
                           description="ListJobsByGroup page size (CALL_PIPELINE_PAGE_SIZE).")
    pages_per_batch: int = Field(default=settings().pages_per_batch, ge=1,
                                 description="Pages whose jobs one mapped chain (steps 2-5) works on together; "
                                             "the first batch is an eighth of it, at least one page "
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
                        "advance_task_state catches up on its work")
    return None


TASK_NAME_TAG = "call_pipeline/task_name"


def task_name_tag_value(task_name: str) -> str:
    """The task's name as its runs' TASK_NAME_TAG holds it: cut at 200 characters, as a label
    (the full name stays in the CRM)."""
    return task_name[:200]

# The job group's progress ("jobs/completed") the run started from; see _tag_progress.
PROGRESS_TAG = "call_pipeline/progress"
# The job group's Status (Executing, Paused, ...) the run started from, for its summary and the
# task's history; set with PROGRESS_TAG, from the same answer.
GROUP_STATUS_TAG = "call_pipeline/group_status"
CRM_ASSET_KEY = dg.AssetKey(["crm", "leads_task_list"])


def _tag_task_name(context: dg.OpExecutionContext, task: repo.TaskRow) -> None:
    """Every run of a task carries its name, whoever launched it: the sensors set it, and a run
    launched otherwise (a backfill, the Launchpad) gets it here; re-executions and run retries
    copy their parent's tags."""
    name = task_name_tag_value(task.task_name)
    if context.run.tags.get(TASK_NAME_TAG) != name:
        context.instance.add_run_tags(context.run_id, {TASK_NAME_TAG: name})


def _tag_progress(context: dg.OpExecutionContext, client, task: repo.TaskRow) -> None:
    """The job group's progress as this run saw it, before its first page: the sensor runs the
    task again when the group has moved on since its last completed run. Sensor runs are tagged
    when requested; any other run (a backfill, the Launchpad) here, with one DescribeJobGroup call
    (in `list_job_pages`, before its first page; only in its first attempt: one read per run, and
    its retries keep their SDK attempts for the pages). Without it (the call failed) the sensor
    runs the task once more, which is harmless."""
    if PROGRESS_TAG in context.run.tags or context.retry_number > 0:
        return
    try:
        progress = parse_job_group(client.describe_job_group(task.job_group_id))
    except OutboundBotError as exc:
        context.log.warning(f"task {task.id}: DescribeJobGroup failed, the run's progress is not recorded: {exc}")
        return
    if progress is not None:
        status = {GROUP_STATUS_TAG: progress.status} if progress.status else {}
        context.instance.add_run_tags(context.run_id, {PROGRESS_TAG: progress.tag, **status})


def _ledger(context: dg.OpExecutionContext, crm: CrmDatabase) -> UnitLedger:
    """Where the run counts the units of one lead that fail (contract §12), once per run."""
    return UnitLedger(crm.engine, context.run_id, settings().max_unit_attempts)


def _step_env(context: dg.OpExecutionContext, crm: CrmDatabase, outboundbot: OutboundBotResource | None = None,
              dashscope: DashScopeResource | None = None,
              recording_archive: RecordingArchiveResource | None = None) -> StepEnv:
    """What the op's steps work with, from its resources (a client it has no resource for is None).
    A step of a run being terminated stops here, before it starts (`run_worker.raise_if_canceling`)."""
    stop = partial(raise_if_canceling, context.run_id)
    stop()
    return StepEnv(engine=crm.engine, zone=crm.zone, clock=crm.now, logger=context.log,
                   outboundbot=outboundbot.get_client() if outboundbot is not None else None,
                   llm=dashscope.get_client() if dashscope is not None else None,
                   llm_concurrency=dashscope.max_concurrency if dashscope is not None else 1,
                   archive=recording_archive.get_archive() if recording_archive is not None else None,
                   ledger=_ledger(context, crm), stop=stop)


def _raise_if_failed(report: StepReport, what: str) -> None:
    message = report.failure_message(what)
    if message:
        raise dg.Failure(description=message)


def _load_task(context: dg.OpExecutionContext, crm: CrmDatabase, outboundbot: OutboundBotResource
               ) -> repo.TaskRow | None:
    """Step 1 for this run's task. Runs launched by hand or by GraphQL are not validated against
    the partition set, so the task is checked here; one that no longer qualifies ends the run
    cleanly (every later step is skipped) with a log line saying why."""
    task_id = _task_id_of(context)
    with crm.engine.connect() as conn:
        task = repo.fetch_task(conn, task_id)
    if task is None:
        context.log.warning(f"task {task_id}: no such call task in the CRM; nothing to do")
        return None
    _tag_task_name(context, task)
    late_jobs_run = context.run.tags.get(LATE_JOBS_TAG) == "true"
    if task.task_type == TASK_FOLLOW_UP_DONE and late_jobs_run:
        context.log.info(f"task {task_id} ({task.task_name}) is at 4 and its job group has new jobs or work "
                         "left: matching and completing them (the task stays at 4)")
        _tag_progress(context, outboundbot.get_client(), task)
        return task
    if task.task_type not in repo.ACTIVE_TASK_TYPES:
        context.log.info(f"task {task_id}: task_type is {task.task_type}, not 2 or 3; nothing to do")
        return None
    if not (task.job_group_id or "").strip():
        context.log.warning(f"task {task_id}: no job_group_id; nothing to do")
        return None
    context.log.info(f"task {task_id} ({task.task_name}): job group {task.job_group_id}, task_type {task.task_type}")
    _tag_progress(context, outboundbot.get_client(), task)
    return task


# The task's check and the fan-out are one op: a step of its own cost a step process's start
# (0.3 s) before the first page, measured on the multiprocess executor (README, Performance).
@dg.op(out={"task": dg.Out(repo.TaskRow, is_required=False), "plan": dg.Out(list[PageRequest], is_required=False),
            "pages": dg.DynamicOut(PageRequest, is_required=False)},
       tags=SYNC_TAGS, pool=queues.SYNC_QUEUE, retry_policy=api_retry_policy())
def list_job_pages(context: dg.OpExecutionContext, config: PagingConfig, crm: CrmDatabase,
                   outboundbot: OutboundBotResource):
    """Checks the run's task (step 1: a task that no longer qualifies yields nothing, so every
    later step is skipped), then fans out: over its job group's pages (one ListJobsByGroup call
    for TotalCount and the page size the cloud uses, then one mapped chain per batch of
    `pages_per_batch` pages), or, when the group has no job that the task's leads do not hold
    already, over the task's jobs that still need work, from the CRM, with no page listed.
    `plan` lists every batch, so that the op after `.collect()` can tell which ones no step of
    the run's lineage completed."""
    task = _load_task(context, crm, outboundbot)
    if task is None:
        return
    plan = _plan_run(context, task, config, crm, outboundbot)
    yield dg.Output(task, "task")
    yield dg.Output(plan, "plan")
    for request in plan:
        yield dg.DynamicOutput(request, mapping_key=request.mapping_key, output_name="pages")


def _plan_run(context: dg.OpExecutionContext, task: repo.TaskRow, config: PagingConfig, crm: CrmDatabase,
              outboundbot: OutboundBotResource) -> list[PageRequest]:
    # The group's size as this run's progress tag has it (the sensor's, or _tag_progress's read):
    # the run's storage copy, since _tag_progress may have just added it.
    run = context.instance.get_run_by_id(context.run_id)
    group_jobs = group_jobs_of_progress_tag((run.tags if run else context.run.tags).get(PROGRESS_TAG))
    with crm.engine.connect() as conn:
        held = repo.count_held_jobs(conn, task.id)
        paging = needs_paging(group_jobs, held)
        job_ids = [] if paging else repo.fetch_job_ids_needing_work(conn, task.id)
    if not paging:
        plan = plan_work_batches(task, job_ids, config.page_size, config.pages_per_batch)
        context.log.info(f"task {task.id}: the job group's {group_jobs} job(s) are all held by its leads "
                         f"({held}): no page listed; {len(job_ids)} job(s) still need work, in {len(plan)} "
                         f"batch(es)")
        return plan
    plan = plan_batches(outboundbot.get_client(), task, config.page_size, config.pages_per_batch)
    pages = sum(request.page_count for request in plan)
    size = plan[0].page_size if plan else config.page_size
    context.log.info(f"task {task.id}: {pages} page(s) of up to {size} jobs, in {len(plan)} "
                     f"batch(es) of up to {config.pages_per_batch} page(s)"
                     + (f"; the cloud answers pages of {size}, not {config.page_size}"
                        if size != config.page_size else "")
                     + (f" (the group has {group_jobs} job(s), the task's leads hold {held})"
                        if group_jobs is not None else ""))
    return plan


@dg.op(tags={**SYNC_TAGS, **chain_priority(2)}, pool=queues.SYNC_QUEUE, retry_policy=api_retry_policy())
def match_job_page(context: dg.OpExecutionContext, page: PageRequest, crm: CrmDatabase,
                   outboundbot: OutboundBotResource) -> PageBatch:
    """Step 2 for one batch of pages: map its jobs to leads (one read, one bulk write)."""
    batch = match_jobs_of_pages(_step_env(context, crm, outboundbot), page)
    if page.job_ids is not None:
        context.log.info(f"task {page.task.id} {batch.label}: {len(batch.job_ids)} matched job(s) that still "
                         "need work, from the CRM (no page listed)")
        return batch
    counts = batch.counts
    context.log.info(f"task {page.task.id} {batch.label}: {counts.jobs_listed} job(s), matched "
                     f"{dict(counts.matched_by)}, already matched {counts.already_matched}, "
                     f"unmatched {counts.unmatched_jobs}")
    return batch


def batch_op(step: BatchStep) -> dg.OpDefinition:
    """The op of one batch step (steps/batch_steps.py): runs it for the batch, then its `then`,
    logs its `done` line, and fails when a unit failed (after saving the rest). A step that
    others follow hands them the batch, its counts added; a last step returns its result."""
    last = step in last_steps()

    def run(context: dg.OpExecutionContext, batch: PageBatch | None) -> PageBatch | BatchResult | None:
        if batch is None:
            return _not_run(context)
        resources = {key: getattr(context.resources, key) for key in step.resources}
        env = _step_env(context, context.resources.crm, **resources)
        report = step.run(env, batch)
        if step.then is not None:
            report.counts = report.counts + step.then(env, batch).counts
        if step.done is not None:
            context.log.info(f"task {batch.task_id} {batch.label}: {step.done(report.counts)}")
        _raise_if_failed(report, f"task {batch.task_id} {batch.label}: {step.failed}")
        if last:
            return BatchResult(batch.page_number, report.counts)
        return PageBatch(batch.task_id, batch.page_number, batch.job_ids, batch.counts + report.counts,
                         batch.page_count)

    return dg.op(name=step.op_name, description=step.description,
                 ins={"batch": dg.In(PageBatch | None)}, out=dg.Out(BatchResult | None if last else PageBatch | None),
                 tags={**celery_tags(step.queue), **chain_priority(step.number)}, pool=step.queue,
                 retry_policy=api_retry_policy(), required_resource_keys={"crm", *step.resources})(run)


# One op per batch step, by step name: the graph (jobs.py) wires them.
BATCH_OPS: dict[str, dg.OpDefinition] = {step.name: batch_op(step) for step in BATCH_STEPS}


def _catch_up_and_mark_unmatched(context: dg.OpExecutionContext, task: repo.TaskRow, plan: list[PageRequest],
                                 totals: StepCounts, results: dict[str, list[BatchResult | None]],
                                 crm: CrmDatabase, outboundbot: OutboundBotResource, dashscope: DashScopeResource,
                                 recording_archive: RecordingArchiveResource) -> StepCounts:
    missing = incomplete_batches(plan, results)
    if missing:
        context.log.info(f"task {task.id}: {len(missing)} batch(es) not completed in this run's lineage "
                         f"({', '.join(r.label for r in missing[:10])}); doing them now")
        report = catch_up_batches(_step_env(context, crm, outboundbot, dashscope, recording_archive), missing)
        totals = totals + report.counts
        _raise_if_failed(report, f"task {task.id}: batches caught up")
    marked, (unidentified, some) = fail_unmatched_leads(crm.engine, task.id, crm.now())
    if marked:
        context.log.warning(f"task {task.id}: {marked} lead(s) matched no job and are marked Failed for now")
    if unidentified:
        context.log.warning(f"task {task.id}: {unidentified} lead(s) have neither a reference id nor a phone, so "
                            f"no job can match them; left as they are: leads {', '.join(map(str, some))}"
                            + (" …" if unidentified > len(some) else ""))
    totals.unmatched_leads_failed += marked
    if totals.masked_phone_jobs:
        # Once per run, whichever batches met them.
        more = totals.masked_phone_jobs - len(totals.masked_phone_examples)
        context.log.warning(f"task {task.id}: {totals.masked_phone_jobs} job(s) carry a masked phone number (such as "
                            "138****8888) and no reference that matches a lead; a masked number matches nobody: "
                            + ", ".join(f"job {j}" for j in totals.masked_phone_examples)
                            + (f" and {more} more job(s)" if more > 0 else ""))
    return totals


# One op after `.collect()`, not one per duty: each step process's start (0.3 s) came after the
# last batch, on every run's critical path (README, Performance). Each duty is safe to redo.
# Its inputs beside `batches` are the results of the batch steps that no step follows, one per
# step, by step name (steps/batch_steps.py): the graph passes each step's `.collect()`.
@dg.op(tags=SYNC_TAGS, retry_policy=api_retry_policy(),
       ins={step.name: dg.In(list[BatchResult | None]) for step in last_steps()})
def advance_task_state(context: dg.OpExecutionContext, task: repo.TaskRow, plan: list[PageRequest],
                       batches: list[PageBatch | None], crm: CrmDatabase, outboundbot: OutboundBotResource,
                       dashscope: DashScopeResource, recording_archive: RecordingArchiveResource,
                       **results: list[BatchResult | None]) -> int:
    """After the last batch: first the batches that no run of this lineage completed (a
    re-execution after a killed run, see steps/catch_up.py); then leads that should have a job
    and have none are marked Failed (provisionally: a later run that matches them clears it);
    then the task's state is evaluated and the run's summary attached."""
    done = [part for step in last_steps() for part in results[step.name]]
    totals = StepCounts.total([part.counts for part in (*batches, *done) if part is not None])
    totals = _catch_up_and_mark_unmatched(context, task, plan, totals, results, crm, outboundbot, dashscope,
                                          recording_archive)
    # The task's interested leads that a batch failed to post (or that a caught-up batch wrote).
    totals = totals + post_hot_leads(_step_env(context, crm), task.id).counts
    before, after = evaluate_task_state(crm.engine, task.id, crm.now())
    with crm.engine.connect() as conn:
        statuses = repo.count_statuses(conn, task.id)
        given_up = repo.fetch_given_up_not_alerted(conn, task.id)
    named = [describe_given_up(u.leads_id, u.call_job_id, u.unit, u.attempts, u.last_error) for u in given_up]
    # Tagged by the sensor or by _tag_progress in this run's first op (read from storage: this op may
    # run in the process that started the run, whose copy of the run predates that tag).
    run = context.instance.get_run_by_id(context.run_id)
    group_status = (run.tags if run else context.run.tags).get(GROUP_STATUS_TAG) or "unknown"
    summary = render_run_summary({**totals.summary_stats(), "statuses": statuses, "task_type_before": before,
                                  "task_type_after": after, "task_id": task.id, "job_group_status": group_status,
                                  "units_given_up": len(given_up), "given_up": named})
    context.add_output_metadata({
        "summary": dg.MetadataValue.md(summary),
        "task_type_before": before,
        "task_type_after": after,
        "job_group_status": group_status,
    })
    _tag_task_name(context, task)
    by_status = {"leads_" + re.sub(r"\W+", "_", k.lower()).strip("_"): v for k, v in statuses.items()}
    # The task's history in the asset catalog: one materialization of its partition per run,
    # with the run's counts and the task's state as numbers the UI plots per partition.
    context.log_event(dg.AssetMaterialization(
        asset_key=CRM_ASSET_KEY, partition=str(task.id), description=f"{task.task_name}: synced",
        metadata={**totals.as_metadata(), **by_status, "leads": sum(statuses.values()),
                  "units_given_up": len(given_up), "job_group_status": group_status,
                  "task_type": after if after is not None else -1, "summary": dg.MetadataValue.md(summary)}))
    if given_up:
        _alert_given_up(context, crm, task, given_up, named)
    context.log.info(f"task {task.id}: task_type {before} -> {after}")
    return after if after is not None else -1


def _alert_given_up(context: dg.OpExecutionContext, crm: CrmDatabase, task: repo.TaskRow,
                    given_up: list[repo.GivenUpUnit], named: list[str]) -> None:
    """One alert for the units given up since the task's last one (contract §12), then they are
    marked alerted; a post that fails is tried again by the task's next run."""
    context.log.warning(f"task {task.id}: {len(given_up)} unit(s) of one lead given up: " + "; ".join(named))
    if settings().alert_webhook_url:
        secrets = [os.environ.get(name, "") for name in SECRET_VARIABLES]
        error = (f"{len(given_up)} unit(s) of one lead failed in {settings().max_unit_attempts} runs and were "
                 f"given up: " + "; ".join(named))
        alert = Alert(task_id=str(task.id), task_name=task.task_name, run_id=context.run_id, job=context.job_name,
                      step="units given up", error=scrub(error, secrets),
                      run_url=f"{settings().ui_base_url}/runs/{context.run_id}")
        try:
            post_json(settings().alert_webhook_url, alert_payload(alert, settings().alert_format))
        except Exception as exc:
            context.log.warning(f"task {task.id}: the alert for the units given up was not posted (posted by the "
                                f"next run): {type(exc).__name__}: {scrub(str(exc), secrets)}")
            return
    with repo.write_transaction(crm.engine) as conn:
        repo.mark_given_up_alerted(conn, task.id, given_up, crm.now())


@dg.op(tags=SYNC_TAGS)
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
        before, after = evaluate_task_state(crm.engine, task.id, crm.now())
        if after is not None and after != before:
            moved[str(task.id)] = f"{before} -> {after}"
    if held:
        context.log.info(f"not evaluated, their last sync run has not completed: {held}")
    context.log.info(f"evaluated {len(tasks) - len(held)} task(s); moved: {moved or 'none'}")
    context.add_output_metadata({"tasks_evaluated": len(tasks) - len(held), "moved": dg.MetadataValue.json(moved),
                                 "held": dg.MetadataValue.json(held)})
    return moved
