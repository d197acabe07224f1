"""What the state of a task's sync runs means for launching and concluding it: one home for the
run-status rules the sensors and the schedule follow."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import dagster as dg

# The sync job's name, for every place that finds its runs or its definition.
SYNC_JOB_NAME = "sync_call_task"
WILL_RETRY_TAG = "dagster/will_retry"
# The daemon launches a run's retry within seconds of its failure. A failed run marked
# `dagster/will_retry` whose retry has not come after this long (the retry could not be launched)
# no longer holds its task.
RETRY_GRACE_SECONDS = 300

# A run in one of these states still holds its task: no second run is requested meanwhile.
ACTIVE_RUN_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]

# A task whose last sync run did not finish may have pages never matched: concluding it now would
# lose their leads for good, since a task at 4 is only checked for late jobs. Its next run evaluates it.
UNFINISHED_RUN_STATUSES = {*ACTIVE_RUN_STATUSES, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


def last_sync_run_status(instance: dg.DagsterInstance, task_id: int) -> dg.DagsterRunStatus | None:
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=SYNC_JOB_NAME, tags={"dagster/partition": str(task_id)}),
                             limit=1)
    return runs[0].status if runs else None


def partitions_with_active_runs(instance: dg.DagsterInstance, job_name: str = SYNC_JOB_NAME,
                                now: float | None = None) -> set[str]:
    """Partitions with a queued or running run, or whose failed run Dagster will retry and has not
    yet (the daemon sets `dagster/will_retry`; for at most RETRY_GRACE_SECONDS after the failure):
    a new run would take the retry's place."""
    now = time.time() if now is None else now
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job_name, statuses=ACTIVE_RUN_STATUSES))
    busy = {run.tags["dagster/partition"] for run in runs if "dagster/partition" in run.tags}
    failed = instance.get_run_records(filters=dg.RunsFilter(
        job_name=job_name, statuses=[dg.DagsterRunStatus.FAILURE], tags={WILL_RETRY_TAG: "true"},
        updated_after=datetime.fromtimestamp(now - RETRY_GRACE_SECONDS, tz=UTC)), limit=500)
    for record in failed:
        run = record.dagster_run
        partition = run.tags.get("dagster/partition")
        if partition is None or partition in busy:
            continue
        if record.end_time is not None and now - record.end_time > RETRY_GRACE_SECONDS:
            continue
        latest = instance.get_runs(filters=dg.RunsFilter(job_name=job_name, tags={"dagster/partition": partition}),
                                   limit=1)
        if latest and latest[0].run_id == run.run_id:  # its retry (or any later run) has not come yet
            busy.add(partition)
    return busy
