"""What a run worker does with a run, whichever launcher handed it over: execute it on the
worker's instance (Dagster's own run body, as `dagster api execute_run` does) and, while the run
is CANCELING, interrupt it until it has ended.

Two run workers use it: a Celery run task (`celery_app.execute_job`, the production shape) and a
run process forked from the launcher's preloaded server (`instance.PreloadedRunLauncher`, the
embedded default)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def execute_run(instance: Any, run_id: str) -> int:
    """Executes the run `run_id` in this thread on `instance`; the exit code Dagster's
    `execute_run` command would give (non-zero when the run failed)."""
    from dagster._cli.api import _execute_run_command_body

    with interrupted_while_canceling(instance, run_id):
        return _execute_run_command_body(instance=instance, run_id=run_id, write_stream_fn=lambda _e: None,
                                         set_exit_code_on_failure=True)


@contextmanager
def interrupted_while_canceling(instance: Any, run_id: str) -> Iterator[None]:
    """While the run is CANCELING (the UI's Terminate, through the project's launchers), send
    this process an interrupt every `run_monitoring.cancellation_thread_poll_interval_seconds`
    until the run has ended. One is not enough: Dagster turns an interrupt inside an op that has a
    retry policy (ours all do) into a retry of the step; the next interrupt, taken between steps,
    stops the retry as it starts, and the run ends CANCELED. Dagster's own cancellation thread
    sends one interrupt only, hence this one. Signals reach only a process's main thread, so with
    a Celery threads pool (a run off the main thread) nothing is sent and Terminate does not stop
    a running run. The thread ends with the run."""
    from dagster import DagsterRunStatus

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ended = threading.Event()

    def watch() -> None:
        while not ended.wait(instance.cancellation_thread_poll_interval_seconds):
            run = instance.get_run_by_id(run_id)
            if run is not None and run.status == DagsterRunStatus.CANCELING:
                os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=watch, name=f"interrupt-on-cancel-{run_id[:8]}", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        ended.set()
        watcher.join()
