"""The executor of `sync_call_task`, chosen by CALL_PIPELINE_EXECUTOR when the definitions load.

Steps 4 and 5 of a batch, and the batches themselves, overlap because the executor runs several
steps at once; each op does its own work (its calls, in threads, within the shared limits) and
returns when it is written, so every executor gives the same result.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
import os
from collections.abc import Mapping, Sequence
from typing import Any, get_args

import dagster as dg

from call_pipeline.run_status import SYNC_JOB_NAME
from call_pipeline.settings import ExecutorName, PipelineSettings, env_name, settings

# Forked step processes start from a server that has these imported already: Dagster, the
# project, the SDKs and pandas (which the project imports only where it uses them, so that the
# run process, the daemon and the webserver do without), and the instance's storage
# (forkserver_preload.py). A step then starts in about 0.3 s instead of 0.9 s.
PRELOADED_MODULES = ["call_pipeline.definitions", "pandas", "alibabacloud_outboundbot20191226.client",
                     "alibabacloud_outboundbot20191226.models", "alibabacloud_tea_openapi.models", "darabonba.core",
                     "dashscope", "call_pipeline.forkserver_preload"]
QUEUE_TAG = "dagster-celery/queue"
# Dagster's multiprocess executor puts its own module first in the forkserver's preload list; a
# forkserver started by the project preloads the same, so that the executor can use it.
FORKSERVER_PRELOAD = ["dagster._core.executor.multiprocess", *PRELOADED_MODULES]


def _execute_run_payload(argv: Sequence[str]) -> dict | None:
    """The ExecuteRunArgs of a run worker's command line (`dagster api execute_run <ExecuteRunArgs>`,
    as the default run launcher and the daemon start it), as JSON; None for any other process."""
    args = list(argv)
    try:
        payload = json.loads(args[args.index("execute_run") + 1])
    except (ValueError, IndexError, TypeError):
        return None
    return payload if isinstance(payload, dict) else None


def runs_sync_job(argv: Sequence[str]) -> bool:
    """Whether `argv` is a run worker's for `sync_call_task`."""
    try:
        return _execute_run_payload(argv)["pipeline_origin"]["pipeline_name"] == SYNC_JOB_NAME
    except (KeyError, TypeError):
        return False


def _run_goes_in_process(argv: Sequence[str]) -> bool:
    """Whether the run of this run worker was asked to run in process (its run config, read from
    the instance the command line names)."""
    from dagster._core.instance import DagsterInstance
    from dagster._grpc.types import ExecuteRunArgs
    from dagster._serdes import deserialize_value

    try:
        args = deserialize_value(json.dumps(_execute_run_payload(argv)), ExecuteRunArgs)
        if args.instance_ref is None:
            return False
        with DagsterInstance.from_ref(args.instance_ref) as instance:
            run = instance.get_run_by_id(args.run_id)
    except Exception:  # noqa: BLE001 - the run itself reports an instance it cannot read, with its context
        return False
    return run is not None and runs_in_process(run.run_config)


def start_forkserver_early(argv: Sequence[str]) -> bool:
    """In the run worker of a `sync_call_task` run on the multiprocess executor, start the
    forkserver now, while the worker is still loading the project, so that its imports (2.5 s
    measured, on every run's critical path: Dagster starts it at the first step) run beside the
    worker's on the machine's other core. Dagster's executor then finds it running with the
    same preload list and uses it; the forkserver ends with the worker, as it would have. A run
    asked to run in process (`IN_PROCESS_RUN_CONFIG`) starts none. Multiprocessing has no option
    for this, hence the hand-written start."""
    if settings().executor != "multiprocess" or not runs_sync_job(argv) or _run_goes_in_process(argv):
        return False
    _start_forkserver()
    return True


def start_step_forkserver(run: dg.DagsterRun) -> bool:
    """`start_forkserver_early` for a run process that has the project imported already (forked by
    `instance.PreloadedRunLauncher`): its step processes' forkserver starts while the run opens."""
    if settings().executor != "multiprocess" or run.job_name != SYNC_JOB_NAME or runs_in_process(run.run_config):
        return False
    _start_forkserver()
    return True


def _start_forkserver() -> None:
    multiprocessing.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)
    multiprocessing.forkserver.ensure_running()


def multiprocess_config(max_concurrent: int, per_queue: int) -> dict:
    # Imported here: this module is imported before the rest of the project (definitions.py).
    from call_pipeline.steps.batch_steps import side_by_side_queues

    return {
        "max_concurrent": max_concurrent,
        "start_method": {"forkserver": {"preload_modules": PRELOADED_MODULES}},
        # With priorities alone the executor would start step 5 of every ready batch before any
        # step 4 (and the reverse): a cap per kind keeps slots for the other kind.
        "tag_concurrency_limits": [{"key": QUEUE_TAG, "value": queue, "limit": per_queue}
                                   for queue in side_by_side_queues()],
    }


def celery_config() -> dict:
    def from_each_process(field: str) -> dict | str:
        # a password in a broker URL never enters the run config
        env = env_name(PipelineSettings, field)
        return {"env": env} if os.environ.get(env) else getattr(settings(), field)

    return {"broker": from_each_process("celery_broker"), "backend": from_each_process("celery_backend"),
            "include": ["call_pipeline.definitions"]}


# A run on the multiprocess executor that the sensor expects to carry little work runs its steps
# in its own process instead, by this run config (`in_process_run_config`): the forkserver's imports
# and a process per step cost seconds of CPU that overlapping steps 4 and 5 wins back only on
# a big run (README "Executors").
IN_PROCESS_RUN_CONFIG = {"execution": {"config": {"in_process": True}}}


def _multiprocess_or_in_process(max_concurrent: int, per_queue: int) -> dg.ExecutorDefinition:
    @dg.configured(dg.multi_or_in_process_executor, config_schema={"in_process": dg.Field(
        bool, default_value=False, description="Run every step in the run's own process (the sensor sets it for a "
        "run with little work, CALL_PIPELINE_IN_PROCESS_MAX_JOBS)")})
    def multiprocess(config: dict) -> dict:
        return {"in_process": {}} if config["in_process"] else {
            "multiprocess": multiprocess_config(max_concurrent, per_queue)}

    return multiprocess


def in_process_run_config() -> dict:
    """The run config that runs a sync_call_task run in process; empty when CALL_PIPELINE_EXECUTOR
    is not multiprocess (in_process already is; celery's runs are sized by their workers)."""
    return IN_PROCESS_RUN_CONFIG if settings().executor == "multiprocess" else {}


def runs_in_process(run_config: Mapping[str, Any]) -> bool:
    """Whether a run's config asks for the in-process mode of the multiprocess executor."""
    execution = run_config.get("execution") if isinstance(run_config, Mapping) else None
    config = execution.get("config") if isinstance(execution, Mapping) else None
    return isinstance(config, Mapping) and config.get("in_process") is True


def sync_executor(name: str | None = None) -> dg.ExecutorDefinition:
    """The executor named by `name` (default: CALL_PIPELINE_EXECUTOR)."""
    name = name or settings().executor
    if name == "in_process":
        return dg.in_process_executor
    if name == "multiprocess":
        return _multiprocess_or_in_process(settings().max_concurrent_steps, settings().max_concurrent_steps_per_queue)
    if name == "celery":
        from dagster_celery import celery_executor

        return celery_executor.configured(celery_config(), name="celery")
    raise ValueError(f"CALL_PIPELINE_EXECUTOR must be one of {', '.join(get_args(ExecutorName))}, got {name!r}")
