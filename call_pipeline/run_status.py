"""What the state of a task's sync runs means for launching and concluding it: one home for the
run-status rules the sensors and the schedule follow."""

from __future__ import annotations

import dagster as dg

SYNC_JOB = "sync_call_task"
WILL_RETRY_TAG = "dagster/will_retry"

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
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=SYNC_JOB, tags={"dagster/partition": str(task_id)}),
                             limit=1)
    return runs[0].status if runs else None


def partitions_with_active_runs(instance: dg.DagsterInstance, job_name: str = SYNC_JOB) -> set[str]:
    """Partitions with a queued or running run, or whose failed run Dagster will retry and has not
    yet (the daemon sets `dagster/will_retry`): a new run would take the retry's place."""
    runs = instance.get_runs(filters=dg.RunsFilter(job_name=job_name, statuses=ACTIVE_RUN_STATUSES))
    busy = {run.tags["dagster/partition"] for run in runs if "dagster/partition" in run.tags}
    failed = instance.get_runs(filters=dg.RunsFilter(job_name=job_name, statuses=[dg.DagsterRunStatus.FAILURE],
                                                     tags={WILL_RETRY_TAG: "true"}), limit=500)
    for run in failed:
        partition = run.tags.get("dagster/partition")
        if partition is None or partition in busy:
            continue
        latest = instance.get_runs(filters=dg.RunsFilter(job_name=job_name, tags={"dagster/partition": partition}),
                                   limit=1)
        if latest and latest[0].run_id == run.run_id:  # its retry (or any later run) has not come yet
            busy.add(partition)
    return busy
