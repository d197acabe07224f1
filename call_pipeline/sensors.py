"""The sensor that keeps every active call task in sync."""


import os
import time
from datetime import timedelta

import dagster as dg

from call_pipeline.clients.outboundbot import OutboundBotError
from call_pipeline.clients.webhook import post_json
from call_pipeline.crm import repository as repo
from call_pipeline.crm.database import ensure_pipeline_tables
from call_pipeline.domain.alerts import Alert, alert_payload, scrub
from call_pipeline.domain.job_groups import GroupProgress, parse_job_groups_page, tasks_with_late_jobs
from call_pipeline.jobs import sync_call_task
from call_pipeline.ops import LATE_JOBS_TAG, PROGRESS_TAG, TASK_NAME_TAG
from call_pipeline.partitions import call_tasks_partitions
from call_pipeline.resources import RESOURCE_SETTINGS, CrmDatabase, OutboundBotResource
from call_pipeline.run_status import partitions_with_active_runs
from call_pipeline.settings import SETTINGS, PipelineSettings, secret_variables

JOB_GROUPS_PAGE_SIZE = 100


def job_group_progress(outboundbot: OutboundBotResource) -> dict:
    """Every job group's progress, in one paged ListJobGroups call (pages of 100)."""
    client = outboundbot.get_client()
    progress, page = {}, 1
    while True:
        groups, total = parse_job_groups_page(client.list_job_groups(page, JOB_GROUPS_PAGE_SIZE))
        progress.update(groups)
        if not groups or page * JOB_GROUPS_PAGE_SIZE >= total:
            return progress
        page += 1


def progress_tag(progress: GroupProgress | None) -> str:
    return progress.tag if progress else "unknown"


def last_completed_run(instance: dg.DagsterInstance, task_id: int) -> dg.RunRecord | None:
    records = instance.get_run_records(
        filters=dg.RunsFilter(job_name=sync_call_task.name, tags={"dagster/partition": str(task_id)},
                              statuses=[dg.DagsterRunStatus.SUCCESS]), limit=1)
    return records[0] if records else None


def why_run(task_id: int, progress: str, work_left: int, last: dg.RunRecord | None, now: float) -> str | None:
    """Why the task needs a run now, as its run key (keys are remembered forever), or None. Each
    key holds the window of CALL_PIPELINE_SENSOR_INTERVAL_SECONDS it was asked in: a run that
    failed for good (its retries too) is asked again in the next window, not never."""
    window = int(now // SETTINGS.sensor_interval_seconds)
    if last is None:
        return f"task-{task_id}-first-{progress}-{window}"
    if progress != "unknown" and last.dagster_run.tags.get(PROGRESS_TAG) != progress:
        return f"task-{task_id}-progress-{progress}-{window}"
    if work_left:
        return f"task-{task_id}-work-{window}"
    ended = last.end_time or last.start_time or last.create_timestamp.timestamp()
    if now - ended >= SETTINGS.sensor_max_interval_seconds:
        return f"task-{task_id}-every-{int(now // SETTINGS.sensor_max_interval_seconds)}"
    return None


@dg.sensor(
    job=sync_call_task,
    minimum_interval_seconds=SETTINGS.sensor_tick_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a partition per active call task (task_type 2 or 3 with a job group) and requests a "
    "run when there is work: its job group's progress (one paged ListJobGroups call per tick for all tasks) "
    "changed since its last completed run, the CRM still holds work for it (a unit that failed), or "
    "CALL_PIPELINE_SENSOR_MAX_INTERVAL_SECONDS passed; never while it has a queued or running run or a "
    "failed run that Dagster will retry.",
)
def call_task_sensor(context: dg.SensorEvaluationContext, crm: CrmDatabase,
                     outboundbot: OutboundBotResource) -> dg.SensorResult:
    with crm.engine.connect() as conn:
        tasks = repo.fetch_active_tasks(conn)
        work = repo.count_lead_work(conn, [task.id for task in tasks], **_hot_lead_work(crm))
    known = set(context.instance.get_dynamic_partitions(call_tasks_partitions.name))
    new_keys = [str(task.id) for task in tasks if str(task.id) not in known]
    busy = partitions_with_active_runs(context.instance, sync_call_task.name)
    groups: dict = {}
    if tasks:
        try:
            groups = job_group_progress(outboundbot)
        except OutboundBotError as exc:
            context.log.warning(f"ListJobGroups failed, progress unknown this tick: {exc}")
    now = time.time()
    run_requests, quiet = [], []
    for task in tasks:
        if str(task.id) in busy:
            continue
        progress = progress_tag(groups.get(task.job_group_id or ""))
        run_key = why_run(task.id, progress, work[task.id].work_left, last_completed_run(context.instance, task.id),
                          now)
        if run_key is None:
            quiet.append(str(task.id))
            continue
        run_requests.append(dg.RunRequest(partition_key=str(task.id), run_key=run_key,
                                          tags={TASK_NAME_TAG: task.task_name[:200], PROGRESS_TAG: progress}))
    skipped = sorted(busy & {str(task.id) for task in tasks})
    if skipped:
        context.log.info("tasks with a queued or running run (or a retry coming), not relaunched: "
                         + ", ".join(skipped))
    if quiet:
        context.log.debug(f"tasks with no change and no work left: {', '.join(quiet)}")
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[call_tasks_partitions.build_add_request(new_keys)] if new_keys else [],
    )


@dg.sensor(
    job=sync_call_task,
    minimum_interval_seconds=SETTINGS.sensor_tick_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Checks the tasks concluded (at 4) within CALL_PIPELINE_RECONCILE_DAYS for jobs that came "
    "late: one paged ListJobGroups call for all of them, each group's TotalJobs against the task's matched "
    "leads. A task whose group grew, or whose late leads still need work, gets a run; it stays at 4.",
)
def late_jobs_sensor(context: dg.SensorEvaluationContext, crm: CrmDatabase,
                     outboundbot: OutboundBotResource) -> dg.SensorResult | dg.SkipReason:
    since = crm.now() - timedelta(days=SETTINGS.reconcile_days)
    with crm.engine.connect() as conn:
        tasks = repo.fetch_recently_concluded_tasks(conn, since)
        work = repo.count_lead_work(conn, [task.id for task in tasks], **_hot_lead_work(crm))
    if not tasks:
        return dg.SkipReason(f"no task concluded in the last {SETTINGS.reconcile_days} day(s)")
    try:
        progress = job_group_progress(outboundbot)
    except OutboundBotError as exc:
        return dg.SkipReason(f"ListJobGroups failed, checked again next tick: {exc}")
    late = tasks_with_late_jobs(progress, {t.id: t.job_group_id or "" for t in tasks},
                                {task_id: counts.matched for task_id, counts in work.items()})
    busy = partitions_with_active_runs(context.instance, sync_call_task.name)
    known = set(context.instance.get_dynamic_partitions(call_tasks_partitions.name))
    requests, new_keys = [], []
    now = time.time()
    for task in tasks:
        key = str(task.id)
        if key in busy:
            continue
        if task.id in late:
            run_key = f"late-{task.id}-{late[task.id]}"  # once per size of the group
        elif work[task.id].calling or work[task.id].work_left:
            run_key = f"late-{task.id}-work-{int(now // SETTINGS.sensor_interval_seconds)}"
        else:
            continue
        if key not in known:
            new_keys.append(key)
        requests.append(dg.RunRequest(partition_key=key, run_key=run_key,
                                      tags={LATE_JOBS_TAG: "true", TASK_NAME_TAG: task.task_name[:200]}))
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[call_tasks_partitions.build_add_request(new_keys)] if new_keys else [],
    )


def _hot_lead_work(crm: CrmDatabase) -> dict:
    """With a hot-lead webhook, an interested lead not posted yet is work left: the run that
    concluded a task may have failed to post it, and only a later run posts it."""
    if not SETTINGS.hot_lead_webhook_url:
        return {}
    ensure_pipeline_tables(crm.engine)
    return {"unposted_hot_leads": True}


# What an alert must never show: every secret setting's value, and boto3's own secret key.
SECRET_VARIABLES = (*secret_variables(PipelineSettings, *RESOURCE_SETTINGS), "AWS_SECRET_ACCESS_KEY")


def _root_message(error) -> str:
    """The innermost cause's message: what failed, under "Exceeded max_retries" and the like."""
    messages = []
    while error is not None:
        messages.append((error.message or "").strip())
        error = error.cause or error.context
    return next((m for m in reversed(messages) if m), "")


def alert_for(context: dg.RunFailureSensorContext) -> Alert:
    run = context.dagster_run
    failures = context.get_step_failure_events()
    step = ", ".join(sorted({event.step_key for event in failures if event.step_key})) or "(the run)"
    errors = [_root_message(event.step_failure_data.error) for event in failures
              if event.step_failure_data and event.step_failure_data.error]
    error = (errors[0] if errors else context.failure_event.message or "the run failed").strip()
    secrets = [os.environ.get(name, "") for name in SECRET_VARIABLES]
    return Alert(task_id=run.tags.get("dagster/partition", ""), task_name=run.tags.get(TASK_NAME_TAG, ""),
                 run_id=run.run_id, job=run.job_name, step=step, error=scrub(error, secrets),
                 run_url=f"{SETTINGS.ui_base_url}/runs/{run.run_id}")


@dg.run_failure_sensor(
    monitored_jobs=[sync_call_task],
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Posts an alert for every failed sync run to CALL_PIPELINE_ALERT_WEBHOOK_URL (none: no "
    "alerts), in CALL_PIPELINE_ALERT_FORMAT (json, dingtalk, wecom, feishu, slack).",
)
def failure_alert_sensor(context: dg.RunFailureSensorContext) -> None:
    if not SETTINGS.alert_webhook_url:
        return
    alert = alert_for(context)
    status = post_json(SETTINGS.alert_webhook_url, alert_payload(alert, SETTINGS.alert_format))
    context.log.info(f"alert for run {alert.run_id} (task {alert.task_id}) posted: HTTP {status}")
