"""All of call_pipeline's Dagster definitions, gathered in one place."""


import dagster as dg

from call_pipeline.jobs import advance_task_states, sync_call_task
from call_pipeline.partitions import call_tasks_partitions
from call_pipeline.resources import resources_from_env
from call_pipeline.schedules import advance_task_states_schedule
from call_pipeline.sensors import call_task_sensor, failure_alert_sensor, late_jobs_sensor

# The CRM table the sync job writes, declared as an external asset with the job's partitions:
# the UI's "add partition" only offers partitions defs that some asset uses.
crm_call_task_leads = dg.AssetSpec(
    key=["crm", "leads_task_list"],
    partitions_def=call_tasks_partitions,
    description="The CRM's leads of each call task (leads_task_list), written by sync_call_task.",
    group_name="crm",
)

defs = dg.Definitions(
    assets=[crm_call_task_leads],
    jobs=[sync_call_task, advance_task_states],
    sensors=[call_task_sensor, late_jobs_sensor, failure_alert_sensor],
    schedules=[advance_task_states_schedule],
    resources=resources_from_env(),
)
