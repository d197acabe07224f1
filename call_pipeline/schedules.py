"""The schedule that advances every task's state, for tasks whose runs do not come often."""

import dagster as dg

from call_pipeline import settings
from call_pipeline.jobs import advance_task_states

advance_task_states_schedule = dg.ScheduleDefinition(
    name="advance_task_states_schedule",
    job=advance_task_states,
    cron_schedule=settings.STATE_SCHEDULE_CRON,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Evaluates SPEC §4 for every task at 2 or 3.",
)
