import dagster as dg

# One partition per CRM call task; the key is the task id as a string.
call_tasks_partitions = dg.DynamicPartitionsDefinition(name="call_tasks")
