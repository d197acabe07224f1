"""The Celery app of `call-pipeline worker`: dagster-celery's step task (the `celery` executor's
steps, on the design's queues, each with priorities as the ops' `dagster-celery/priority` tags ask)
and its run task (runs launched by the instance's `CeleryRunLauncher`, on the `runs` queue), on
the broker and result backend of CALL_PIPELINE_CELERY_BROKER / _BACKEND.

The worker imports the project once, before it forks its pool processes; a run is then a call in a
pool process that already holds the definitions and one Dagster instance, not a new process."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from celery.result import allow_join_result
from celery.signals import worker_init, worker_process_shutdown
from dagster_celery.config import TASK_EXECUTE_JOB_NAME
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_resume_job_task, create_task
from kombu import Queue

from call_pipeline.instance import POOL_RECYCLE_S, keep_connections
from call_pipeline.queues import WORKER_QUEUES
from call_pipeline.run_worker import execute_run
from call_pipeline.settings import settings

app = make_app({"broker": settings().celery_broker, "backend": settings().celery_backend,
                "include": ["call_pipeline.definitions"], "config_source": {
                    # one step at a time per worker process: a long step-5 batch does not hold others back
                    "worker_prefetch_multiplier": 1,
                    "task_acks_late": True,
                }})
app.conf.task_queues = [Queue(name, routing_key=f"{name}.#", queue_arguments={"x-max-priority": 10})
                        for name in ("dagster", *WORKER_QUEUES)]

execute_plan = create_task(app)
resume_job = create_resume_job_task(app)

_instance: Any = None
_opening = threading.Lock()


class _JoinAllowance:
    """Celery's `allow_join_result`, shared by the runs of one process. The `celery` executor,
    inside a run task, waits for its steps' results; Celery forbids that in a task unless allowed
    (its guard is against a worker waiting for its own queue: the steps go to the design's queues,
    the run to `runs`). Celery's context sets a process-wide flag and restores it on exit, so on a
    threads pool the first of two runs to end put the guard back under the other, whose next
    `result.get()` then failed its run ("Never call result.get() within a task"). Hand-written
    because Celery has no per-thread form: the first run in allows, the last one out restores."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._allowed: Any = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._holders == 0:
                self._allowed = allow_join_result()
                self._allowed.__enter__()
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    self._allowed.__exit__(None, None, None)
                    self._allowed = None


joins_allowed = _JoinAllowance()


# A pool process keeps one storage connection open, as the webserver does (Dagster's
# `optimize_for_webserver`; recycled after an hour, the webserver's default); Dagster's MySQL
# storage otherwise opens a connection for every event a run writes. Beyond the one kept, as many
# as the runs of a threads pool ask for at once (-1: no cap, so that none waits for another's),
# each closed when given back, as before.
_POOL_MAX_OVERFLOW = -1
_STATEMENT_TIMEOUT_MS = 15000
# Connections a threads pool's process keeps per storage: its runs write events at once, and an
# overflow connection is opened and closed for each write (mysql-connector, in Python: py-spy
# showed a fifth of 100 runs' samples connecting). Bounded so that a worker's three storages stay
# far below MariaDB's default of 151 connections.
_THREADS_POOL_KEPT_CONNECTIONS = 16

# Runs one process of this worker executes at once: the threads pool's concurrency, else 1.
_run_slots = 1


def worker_instance() -> Any:
    """The Dagster instance ($DAGSTER_HOME) of this pool process, opened at its first run and
    kept, with its storage connections: opening them is part of what a run would otherwise pay
    each time. With the threads pool the runs of the process share it."""
    global _instance  # noqa: PLW0603 - one per process, by design
    with _opening:
        if _instance is None:
            import dagster as dg

            _instance = dg.DagsterInstance.get()
            _instance.optimize_for_webserver(_STATEMENT_TIMEOUT_MS, POOL_RECYCLE_S, _POOL_MAX_OVERFLOW)
            if _run_slots > 1:
                keep_connections(_instance, min(_run_slots, _THREADS_POOL_KEPT_CONNECTIONS))
    return _instance


@worker_init.connect
def _preload(sender: Any = None, **_kwargs: Any) -> None:
    """In the worker's main process, before it forks its pool: what the step processes' forkserver
    preloads (the SDKs, pandas and the instance's storage, which the project imports only where it
    uses them), so that each pool process does not import them again at its first run or step.
    Notes how many runs a process of this worker executes at once (`_run_slots`)."""
    global _run_slots  # noqa: PLW0603 - one per process, by design
    import importlib

    if sender is not None:
        from celery.concurrency import get_implementation

        # still as given on the command line (a name) when worker_init is sent
        if get_implementation(sender.pool_cls).__module__ == "celery.concurrency.thread":
            _run_slots = max(1, int(sender.concurrency))

    from call_pipeline.executors import PRELOADED_MODULES

    for module in PRELOADED_MODULES:
        importlib.import_module(module)


@worker_process_shutdown.connect
def _dispose_instance(**_kwargs: Any) -> None:
    if _instance is not None:
        _instance.dispose()


# Late acknowledgement, also when the pool process dies under the task: the message goes back to
# the queue and its next delivery fails the run (below), whether the whole worker or only its
# pool process was killed; the run retry then runs it. (Acknowledged instead, the task's result
# would say FAILURE, which run monitoring reads only every poll interval; killed with its whole
# worker, the result stays STARTED, which monitoring reads as "running" for max_runtime_seconds.)
@app.task(bind=True, name=TASK_EXECUTE_JOB_NAME, track_started=True, acks_late=True, reject_on_worker_lost=True)
def execute_job(self: Any, execute_job_args_packed: Any) -> int:
    """dagster-celery's run task (`CeleryRunLauncher.launch_run` sends it by name), on the
    worker's own instance. A run that is STARTED already when its task begins had a worker that
    died under it (RabbitMQ delivers the message again only when the one that held it is gone):
    it is failed here, with the reason, so that its run retry takes over."""
    from dagster import DagsterRunStatus
    from dagster._core.events import JobFailureData, RunFailureReason
    from dagster._grpc.types import ExecuteRunArgs
    from dagster._serdes import unpack_value

    args = unpack_value(execute_job_args_packed, as_type=ExecuteRunArgs)
    instance = worker_instance()
    run = instance.get_run_by_id(args.run_id)
    if run is not None and run.status == DagsterRunStatus.STARTED:
        instance.report_run_failed(
            run, f"The run's Celery worker stopped while it ran (task {self.request.id} delivered again to "
                 f"{self.request.hostname}); marking the run failed so that its retry runs it.",
            job_failure_data=JobFailureData(error=None, failure_reason=RunFailureReason.RUN_WORKER_RESTART))
        return 1
    with joins_allowed():
        return execute_run(instance, args.run_id)
