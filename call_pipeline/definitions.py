"""All of call_pipeline's Dagster definitions, gathered in one place."""

import sys

import dagster as dg

from call_pipeline.executors import start_forkserver_early

# A run worker of the sync job starts its forkserver before it imports the rest of the project,
# so that both import side by side; the check on its command line costs nothing elsewhere
# (call_pipeline/executors.py says why).
start_forkserver_early(sys.argv)

from call_pipeline.instance import keep_connections_in_this_process  # noqa: E402

# A process that loads the definitions keeps a connection to each storage of a MySQL instance, as
# Dagster's webserver does: Dagster's code server opens an instance for every sensor tick, and
# dagster-mysql connects for every query (call_pipeline/instance.py, `keep_connections`). One, not
# more: every run, step and worker process loads the definitions too, and MariaDB's connections
# are counted (151 by default).
keep_connections_in_this_process(1)

from call_pipeline.jobs import advance_task_states, sync_call_task  # noqa: E402
from call_pipeline.partitions import call_tasks_partitions  # noqa: E402
from call_pipeline.resources import resources_from_env  # noqa: E402
from call_pipeline.schedules import make_advance_task_states_schedule  # noqa: E402
from call_pipeline.sensors import failure_alert_sensor, make_call_task_sensor, make_late_jobs_sensor  # noqa: E402

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
    sensors=[make_call_task_sensor(), make_late_jobs_sensor(), failure_alert_sensor],
    schedules=[make_advance_task_states_schedule()],
    resources=resources_from_env(),
)
