"""The sensor that keeps every active call task in sync."""


import json
import os
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import dagster as dg
import requests

from call_pipeline.clients.outboundbot import OutboundBotError
from call_pipeline.clients.webhook import post_json
from call_pipeline.crm import repository as repo
from call_pipeline.crm.database import ensure_pipeline_tables
from call_pipeline.domain.alerts import Alert, StoppedGroupAlert, alert_payload, scrub, stopped_group_payload
from call_pipeline.domain.job_groups import (
    GroupProgress,
    StoppedGroup,
    jobs_for_the_next_run,
    list_start_time,
    next_page_is_cheaper,
    pages_left,
    parse_job_group,
    parse_job_groups_page,
    tasks_with_late_jobs,
    track_stopped_group,
)
from call_pipeline.executors import in_process_run_config
from call_pipeline.jobs import sync_call_task
from call_pipeline.ops import GROUP_STATUS_TAG, LATE_JOBS_TAG, PROGRESS_TAG, TASK_NAME_TAG, task_name_tag_value
from call_pipeline.partitions import call_tasks_partitions
from call_pipeline.resources import SECRET_VARIABLES, CrmDatabase, OutboundBotResource
from call_pipeline.run_status import partitions_with_active_runs
from call_pipeline.settings import settings

JOB_GROUPS_PAGE_SIZE = 100


def read_watched_groups(client, watched: set[str], created_ms: dict[str, int],
                        log) -> dict[str, GroupProgress]:
    """The progress and status of the `watched` job groups, in as few calls as the numbers allow
    (SPEC §12): ListJobGroups filtered by creation time (StartTime: the oldest watched group's
    CreationTime, learnt from an earlier answer, `created_ms`; unfiltered while none is known)
    page by page while the pages left are fewer than the groups still missing, then one
    DescribeJobGroup per group still missing (those the listing did not reach). Unfiltered,
    ListJobGroups pages over every group the instance ever had. A call that fails is logged and
    leaves its groups unknown this tick; the others are still read."""
    found: dict[str, GroupProgress] = {}
    start = list_start_time(created_ms, watched)
    left, page = None, 0
    while next_page_is_cheaper(left, len(watched - found.keys())):
        page += 1
        try:
            groups, total = parse_job_groups_page(
                client.list_job_groups(page, JOB_GROUPS_PAGE_SIZE, start_time_ms=start))
        except OutboundBotError as exc:
            log.warning(f"ListJobGroups failed (page {page}); the groups it did not reach are described: {exc}")
            break
        found.update({group_id: progress for group_id, progress in groups.items() if group_id in watched})
        left = pages_left(total, JOB_GROUPS_PAGE_SIZE, page) if groups else 0
    for group_id in sorted(watched - found.keys()):
        try:
            progress = parse_job_group(client.describe_job_group(group_id))
        except OutboundBotError as exc:
            log.warning(f"DescribeJobGroup {group_id} failed, its progress is unknown this tick: {exc}")
            continue
        if progress is not None:
            found[group_id] = progress
    return found


def load_cursor(cursor: str | None) -> dict:
    """A sensor's memory between ticks: the watched groups' creation times ("created") and, for
    call_task_sensor, the tasks whose group it saw stopped ("stopped"). A cursor it cannot read
    (an operator reset it) starts empty: the next tick lists unfiltered (or describes), as a first
    tick does, and learns the creation times again."""
    try:
        state = json.loads(cursor) if cursor else {}
    except ValueError:
        state = {}
    return state if isinstance(state, dict) else {}


def learned_creation_times(previous: dict, watched: set[str], groups: dict[str, GroupProgress]) -> dict[str, int]:
    """The creation times to remember: the watched groups' only (a group no task watches any
    more is forgotten), from this tick's answers or an earlier one's."""
    created = {}
    for group_id in watched:
        progress = groups.get(group_id)
        value = progress.created_ms if progress is not None and progress.created_ms else previous.get(group_id)
        if isinstance(value, int):
            created[group_id] = value
    return created


def progress_tag(progress: GroupProgress | None) -> str:
    return progress.tag if progress else "unknown"


def last_completed_run(instance: dg.DagsterInstance, task_id: int) -> dg.RunRecord | None:
    records = instance.get_run_records(
        filters=dg.RunsFilter(job_name=sync_call_task.name, tags={"dagster/partition": str(task_id)},
                              statuses=[dg.DagsterRunStatus.SUCCESS]), limit=1)
    return records[0] if records else None


def run_key_for(task_id: int, progress: str, work_left: int, last: dg.RunRecord | None, now: float) -> str | None:
    """Why the task needs a run now, as its run key (keys are remembered forever), or None. Each
    key holds the window of CALL_PIPELINE_SENSOR_INTERVAL_SECONDS it was asked in: a run that
    failed for good (its retries too) is asked again in the next window, not never."""
    window = int(now // settings().sensor_interval_seconds)
    if last is None:
        return f"task-{task_id}-first-{progress}-{window}"
    if progress != "unknown" and last.dagster_run.tags.get(PROGRESS_TAG) != progress:
        return f"task-{task_id}-progress-{progress}-{window}"
    if work_left:
        return f"task-{task_id}-work-{window}"
    ended = last.end_time or last.start_time or last.create_timestamp.timestamp()
    if now - ended >= settings().sensor_max_interval_seconds:
        return f"task-{task_id}-every-{int(now // settings().sensor_max_interval_seconds)}"
    return None


def run_config_for_size(expected_jobs: int | None) -> dict:
    """A run expected to carry at most CALL_PIPELINE_IN_PROCESS_MAX_JOBS jobs runs in process
    (when the executor is multiprocess: README "Executors"); any other keeps its executor's."""
    if expected_jobs is not None and expected_jobs <= settings().in_process_max_jobs:
        return in_process_run_config()
    return {}


def check_stopped_groups(context: dg.SensorEvaluationContext, tasks: list[repo.TaskRow],
                         groups: dict[str, GroupProgress], remembered: dict, now: float) -> dict:
    """Alerts for the tasks whose job group has been Paused, Draft or Initializing for longer than
    CALL_PIPELINE_STALLED_GROUP_SECONDS, at most once a day per task; returns what the cursor
    keeps ({task id: [status, first seen stopped, last alert]}, the stopped groups only).

    It runs here, in the sensor that already reads every active task's group each tick, and not
    in the runs: a stopped group brings no new work, so its task may get no run for hours, and
    the alert must come all the same; the status costs no call of its own here. A post that
    fails is not remembered as sent, so the next tick tries again."""
    kept = {}
    for task in tasks:
        raw = remembered.get(str(task.id))
        previous = StoppedGroup(str(raw[0]), float(raw[1]), None if raw[2] is None else float(raw[2])) \
            if isinstance(raw, list) and len(raw) == 3 else None
        group = groups.get(task.job_group_id or "")
        status = (group.status or None) if group is not None else None
        stopped, due = track_stopped_group(previous, status, now, settings().stalled_group_seconds)
        if stopped is not None and due and _post_stopped_group_alert(context, task, stopped, now):
            stopped = replace(stopped, alerted_at=now)
        if stopped is not None:
            kept[str(task.id)] = [stopped.status, stopped.since, stopped.alerted_at]
    return kept


def _post_stopped_group_alert(context: dg.SensorEvaluationContext, task: repo.TaskRow, stopped: StoppedGroup,
                              now: float) -> bool:
    """True once the operator has been told (posted, or logged when no webhook is set)."""
    since = datetime.fromtimestamp(stopped.since, UTC).isoformat(timespec="seconds")
    message = (f"task {task.id} ({task.task_name}): job group {task.job_group_id} has been {stopped.status} "
               f"since {since} (longer than {settings().stalled_group_seconds} s); the task stays at 2 until it "
               "calls again")
    if not settings().alert_webhook_url:
        context.log.warning(message + " (no CALL_PIPELINE_ALERT_WEBHOOK_URL: logged only)")
        return True
    alert = StoppedGroupAlert(
        task_id=str(task.id), task_name=task.task_name, job_group_id=task.job_group_id or "", status=stopped.status,
        stopped_since=since, stopped_hours=round((now - stopped.since) / 3600, 1),
        task_url=f"{settings().ui_base_url}/assets/crm/leads_task_list?view=partitions&partition={task.id}")
    try:
        status = post_json(settings().alert_webhook_url, stopped_group_payload(alert, settings().alert_format))
    except requests.RequestException as exc:
        context.log.warning(f"{message}; the alert could not be posted, tried again next tick: "
                            f"{type(exc).__name__}")
        return False
    context.log.warning(f"{message}; alert posted: HTTP {status}")
    return True


def call_task_sensor_tick(context: dg.SensorEvaluationContext, crm: CrmDatabase,
                          outboundbot: OutboundBotResource) -> dg.SensorResult:
    with crm.engine.connect() as conn:
        tasks = repo.fetch_active_tasks(conn)
        work = repo.count_lead_work(conn, [task.id for task in tasks], **_hot_lead_work(crm))
    known = set(context.instance.get_dynamic_partitions(call_tasks_partitions.name))
    new_keys = [str(task.id) for task in tasks if str(task.id) not in known]
    busy = partitions_with_active_runs(context.instance, sync_call_task.name)
    memory = load_cursor(context.cursor)
    watched = {task.job_group_id for task in tasks if task.job_group_id}
    groups = read_watched_groups(outboundbot.get_client(), watched, memory.get("created") or {}, context.log)
    now = time.time()
    stopped = check_stopped_groups(context, tasks, groups, memory.get("stopped") or {}, now)
    run_requests, quiet = [], []
    for task in tasks:
        if str(task.id) in busy:
            continue
        group = groups.get(task.job_group_id or "")
        progress = progress_tag(group)
        last = last_completed_run(context.instance, task.id)
        run_key = run_key_for(task.id, progress, work[task.id].work_left, last, now)
        if run_key is None:
            quiet.append(str(task.id))
            continue
        tags = {TASK_NAME_TAG: task_name_tag_value(task.task_name), PROGRESS_TAG: progress}
        if group is not None and group.status:
            tags[GROUP_STATUS_TAG] = group.status
        expected = jobs_for_the_next_run(group, last.dagster_run.tags.get(PROGRESS_TAG) if last else None,
                                         work[task.id].matched, work[task.id].work_left)
        run_requests.append(dg.RunRequest(partition_key=str(task.id), run_key=run_key, tags=tags,
                                          run_config=run_config_for_size(expected)))
    skipped = sorted(busy & {str(task.id) for task in tasks})
    if skipped:
        context.log.info("tasks with a queued or running run (or a retry coming), not relaunched: "
                         + ", ".join(skipped))
    if quiet:
        context.log.debug(f"tasks with no change and no work left: {', '.join(quiet)}")
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[call_tasks_partitions.build_add_request(new_keys)] if new_keys else [],
        cursor=json.dumps({"created": learned_creation_times(memory.get("created") or {}, watched, groups),
                           "stopped": stopped}, sort_keys=True),
    )


def make_call_task_sensor() -> dg.SensorDefinition:
    """call_task_sensor, ticking every CALL_PIPELINE_SENSOR_TICK_SECONDS as it is when the definitions load."""
    return dg.sensor(
        name="call_task_sensor",
        job=sync_call_task,
        minimum_interval_seconds=settings().sensor_tick_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Adds a partition per active call task (task_type 2 or 3 with a job group) and requests a "
        "run when there is work: its job group's progress (ListJobGroups filtered by creation time, or "
        "DescribeJobGroup per task, whichever is fewer calls) changed since its last completed run, the CRM "
        "still holds work for it (a unit that failed), or "
        "CALL_PIPELINE_SENSOR_MAX_INTERVAL_SECONDS passed; never while it has a queued or running run or a "
        "failed run that Dagster will retry. A task whose group is Paused, Draft or Initializing for longer than "
        "CALL_PIPELINE_STALLED_GROUP_SECONDS raises an alert, at most once a day per task.",
    )(call_task_sensor_tick)


def late_jobs_sensor_tick(context: dg.SensorEvaluationContext, crm: CrmDatabase,
                          outboundbot: OutboundBotResource) -> dg.SensorResult | dg.SkipReason:
    since = crm.now() - timedelta(days=settings().reconcile_days)
    with crm.engine.connect() as conn:
        tasks = repo.fetch_recently_concluded_tasks(conn, since)
        work = repo.count_lead_work(conn, [task.id for task in tasks], **_hot_lead_work(crm))
    if not tasks:
        return dg.SkipReason(f"no task concluded in the last {settings().reconcile_days} day(s)")
    memory = load_cursor(context.cursor)
    watched = {task.job_group_id for task in tasks if task.job_group_id}
    progress = read_watched_groups(outboundbot.get_client(), watched, memory.get("created") or {}, context.log)
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
            run_key = f"late-{task.id}-work-{int(now // settings().sensor_interval_seconds)}"
        else:
            continue
        if key not in known:
            new_keys.append(key)
        last = last_completed_run(context.instance, task.id)
        expected = jobs_for_the_next_run(progress.get(task.job_group_id or ""),
                                         last.dagster_run.tags.get(PROGRESS_TAG) if last else None,
                                         work[task.id].matched, work[task.id].work_left)
        requests.append(dg.RunRequest(partition_key=key, run_key=run_key, run_config=run_config_for_size(expected),
                                      tags={LATE_JOBS_TAG: "true", TASK_NAME_TAG: task_name_tag_value(task.task_name)}))
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[call_tasks_partitions.build_add_request(new_keys)] if new_keys else [],
        cursor=json.dumps({"created": learned_creation_times(memory.get("created") or {}, watched, progress)},
                          sort_keys=True),
    )


def make_late_jobs_sensor() -> dg.SensorDefinition:
    """late_jobs_sensor, ticking every CALL_PIPELINE_SENSOR_TICK_SECONDS as it is when the definitions load."""
    return dg.sensor(
        name="late_jobs_sensor",
        job=sync_call_task,
        minimum_interval_seconds=settings().sensor_tick_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Checks the tasks concluded (at 4) within CALL_PIPELINE_RECONCILE_DAYS for jobs that came "
        "late: their groups read with ListJobGroups filtered by creation time or DescribeJobGroup per task "
        "(whichever is fewer calls), each group's TotalJobs against the task's matched "
        "leads. A task whose group grew, or whose late leads still need work, gets a run; it stays at 4.",
    )(late_jobs_sensor_tick)


def _hot_lead_work(crm: CrmDatabase) -> dict:
    """With a hot-lead webhook, an interested lead not posted yet is work left: the run that
    concluded a task may have failed to post it, and only a later run posts it."""
    if not settings().hot_lead_webhook_url:
        return {}
    ensure_pipeline_tables(crm.engine)
    return {"unposted_hot_leads": True}


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
                 run_url=f"{settings().ui_base_url}/runs/{run.run_id}")


@dg.run_failure_sensor(
    monitored_jobs=[sync_call_task],
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Posts an alert for every failed sync run to CALL_PIPELINE_ALERT_WEBHOOK_URL (none: no "
    "alerts), in CALL_PIPELINE_ALERT_FORMAT (json, dingtalk, wecom, feishu, slack).",
)
def failure_alert_sensor(context: dg.RunFailureSensorContext) -> None:
    if not settings().alert_webhook_url:
        return
    alert = alert_for(context)
    status = post_json(settings().alert_webhook_url, alert_payload(alert, settings().alert_format))
    context.log.info(f"alert for run {alert.run_id} (task {alert.task_id}) posted: HTTP {status}")
