"""The graph jobs."""


import dagster as dg

from call_pipeline.executors import sync_executor
from call_pipeline.ops import BATCH_OPS, advance_all_task_states, advance_task_state, list_job_pages, match_job_page
from call_pipeline.partitions import call_tasks_partitions
from call_pipeline.run_status import SYNC_JOB_NAME

# Run retries re-execute only the failed mapped step and what follows it, on the same partition.
RUN_RETRY_TAGS = {"dagster/max_retries": "2", "dagster/retry_strategy": "FROM_FAILURE"}


@dg.job(
    name=SYNC_JOB_NAME,
    partitions_def=call_tasks_partitions,
    executor_def=sync_executor(),
    tags=RUN_RETRY_TAGS,
    description="Sync one CRM call task (partition = task id) with OutboundBot and DashScope: "
    "map jobs to leads, fetch call results and recordings, write AI follow-ups, advance the task.",
)
def sync_call_task():
    # One fan-out over the job group's pages; every later step is chained on it with .map(),
    # so a page's results, recordings and follow-ups start as soon as that page is matched.
    # The batch steps' ops are those of steps/batch_steps.py, by step name; each maps over the
    # batches of the step it follows there (a test checks that this graph and that list agree).
    task, plan, pages = list_job_pages()
    batches = pages.map(match_job_page).map(BATCH_OPS["call_results"])
    # Steps 4 and 5 of a batch, mapped side by side: the executor runs them at once, with each
    # other and with later batches.
    recordings = batches.map(BATCH_OPS["recordings"])
    follow_ups = batches.map(BATCH_OPS["follow_ups"])
    advance_task_state(task, plan, batches.collect(), recordings=recordings.collect(),
                       follow_ups=follow_ups.collect())


@dg.job(executor_def=dg.in_process_executor,
        description="Advance the state (2 -> 3 -> 4) of every CRM call task at 2 or 3.")
def advance_task_states():
    advance_all_task_states()
