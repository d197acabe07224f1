"""The schedule that advances every task's state, for tasks whose runs do not come often."""

import dagster as dg

from call_pipeline.jobs import advance_task_states
from call_pipeline.settings import settings


def make_advance_task_states_schedule() -> dg.ScheduleDefinition:
    """The schedule, on CALL_PIPELINE_STATE_SCHEDULE_CRON as it is when the definitions load."""
    return dg.ScheduleDefinition(
        name="advance_task_states_schedule",
        job=advance_task_states,
        cron_schedule=settings().state_schedule_cron,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Moves each task at 2 or 3 up: to calls done (3) when every matched lead has a final call "
        "status, to follow-up done (4) when every one has a follow-up. Skips a task whose last sync run failed "
        "or is still under way.",
    )
