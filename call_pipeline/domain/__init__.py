"""The pure core of call_pipeline: plain functions on plain data.

No Dagster, no database, no network here, so every rule of SPEC §3-§4 and every bad input of §7 is
unit-tested on its own. Import from the submodules (phones, matching, call_results, followups,
task_state, summary).
"""
