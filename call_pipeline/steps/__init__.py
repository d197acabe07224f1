"""The work of each step for one task: read what still needs work, call the pure core, write.

Plain functions with no Dagster in them; the ops call them and report. Each returns only when its
batch's work is done and written: the threads a step uses for its calls end with it. A failure is
confined to the smallest unit (one ListJobs call, one recording, one lead's follow-up), logged with
what and why, and listed in the step's report, so that its op can fail after saving the rest.

Modules, by step: `batch` (what the ops hand each other), `env` (what every step works with),
`paging` (the fan-out), `matching` (step 2), `call_results` (step 3), `recordings` (step 4),
`follow_ups` (step 5), `batch_steps` (the list of steps 3 to 5, each `(env, batch) -> StepReport`,
that the ops and the catch-up are built from), `task_state` (unmatched leads and the task's
state), `catch_up` (batches a re-execution never started).
"""
