"""The sensor that keeps every active call task in sync."""


import time

import dagster as dg

from call_pipeline import settings
from call_pipeline.crm import repository as repo
from call_pipeline.jobs import sync_call_task
from call_pipeline.partitions import call_tasks_partitions
from call_pipeline.resources import CrmDatabase

# A run in one of these states still holds its task: no second run is requested meanwhile.
ACTIVE_RUN_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def partitions_with_active_runs(instance: dg.DagsterInstance, job_name: str) -> set[str]:
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job_name, statuses=ACTIVE_RUN_STATUSES))
    return {run.tags["dagster/partition"] for run in runs if "dagster/partition" in run.tags}


def run_key_for(task_id: int, now: float, interval_seconds: int) -> str:
    """Run keys are remembered forever, so the key carries the interval's number: each task gets
    at most one run per interval, and a new key (a relaunch) in the next one."""
    return f"task-{task_id}-{int(now // interval_seconds)}"


@dg.sensor(
    job=sync_call_task,
    minimum_interval_seconds=settings.SENSOR_TICK_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a partition per active call task (task_type 2 or 3 with a job group) and "
    "requests a run for it once per interval, never while it already has a queued or running run.",
)
def call_task_sensor(context: dg.SensorEvaluationContext, crm: CrmDatabase) -> dg.SensorResult:
    with crm.engine.connect() as conn:
        tasks = repo.fetch_active_tasks(conn)
    known = set(context.instance.get_dynamic_partitions(call_tasks_partitions.name))
    new_keys = [str(task.id) for task in tasks if str(task.id) not in known]
    busy = partitions_with_active_runs(context.instance, sync_call_task.name)
    now = time.time()
    run_requests = [
        dg.RunRequest(
            partition_key=str(task.id),
            run_key=run_key_for(task.id, now, settings.SENSOR_INTERVAL_SECONDS),
            tags={"call_pipeline/task_name": task.task_name[:200]},
        )
        for task in tasks
        if str(task.id) not in busy
    ]
    skipped = sorted(busy & {str(task.id) for task in tasks})
    if skipped:
        context.log.info(f"tasks with a queued or running run, not relaunched: {', '.join(skipped)}")
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[call_tasks_partitions.build_add_request(new_keys)] if new_keys else [],
    )
