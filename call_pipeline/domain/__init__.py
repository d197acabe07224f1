"""The pure core of call_pipeline: plain functions on plain data.

No Dagster, no database, no network here, so every rule of docs/contract.md (the steps and "Task
state") and every case of its "Bad input" is unit-tested on its own. Import from the submodules
(phones, matching, call_results, followups, task_state, summary).
"""
