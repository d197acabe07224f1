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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def execute_run(instance: Any, run_id: str) -> int:
    """Executes the run `run_id` in this thread on `instance`; the exit code Dagster's
    `execute_run` command would give (non-zero when the run failed)."""
    from dagster._cli.api import _execute_run_command_body

    sleep_while_a_step_waits_for_its_pool()
    with interrupted_while_canceling(instance, run_id):
        return _execute_run_command_body(instance=instance, run_id=run_id, write_stream_fn=lambda _e: None,
                                         set_exit_code_on_failure=True)


def sleep_while_a_step_waits_for_its_pool() -> None:
    """Makes a run whose next step waits for a pool slot sleep until its next claim, as Dagster
    means it to, instead of spinning on a core. Dagster 1.13's in-process executor sleeps for
    `InstanceConcurrencyContext.interval_to_next_pending_claim_check()`, which answers
    `min(0, ...)`, never more than 0 (upstream: dagster-io/dagster pull request #20367, closed
    unmerged). Seen with py-spy: 100 runs of a threads pool, most waiting for a slot, held the
    worker's core in `ActiveExecution.get_next_step`. Only that sleep reads the interval; the
    claims and their backoff stay Dagster's. Patched in the run worker's process, once."""
    from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext

    if getattr(InstanceConcurrencyContext.interval_to_next_pending_claim_check, "sleeps", False):
        return

    def interval_to_next_pending_claim_check(self: InstanceConcurrencyContext) -> float:
        waiting = [self._pending_timeouts[key] for key in self._pending_claims if key in self._pending_timeouts]
        if not waiting or len(waiting) < len(self._pending_claims):
            return 0.0  # a claim to make now
        return max(0.0, min(waiting) - time.time())

    interval_to_next_pending_claim_check.sleeps = True  # type: ignore[attr-defined]
    InstanceConcurrencyContext.interval_to_next_pending_claim_check = interval_to_next_pending_claim_check


# The runs of this process that are CANCELING and run off its main thread (a Celery threads pool):
# signals cannot reach them, so their steps stop themselves between units (`raise_if_canceling`).
_canceling: set[str] = set()


def raise_if_canceling(run_id: str) -> None:
    """Raises Dagster's interrupt when the run `run_id`, run off this process's main thread, is
    CANCELING. A step calls it as it starts and between the batches it writes: raised from an op,
    the interrupt is not turned into a retry (it is no `Exception`), so the step fails as
    interrupted and the run ends CANCELED; what was written stays."""
    if run_id in _canceling:
        from dagster._core.errors import DagsterExecutionInterruptedError

        raise DagsterExecutionInterruptedError(f"run {run_id} was terminated")


@contextmanager
def interrupted_while_canceling(instance: Any, run_id: str) -> Iterator[None]:
    """While the run is CANCELING (the UI's Terminate, through the project's launchers), stop it,
    asking every `run_monitoring.cancellation_thread_poll_interval_seconds` until the run has
    ended. On the process's main thread the stop is an interrupt, sent again at each poll: Dagster
    turns an interrupt inside an op that has a retry policy (ours all do) into a retry of the step;
    the next interrupt, taken between steps, stops the retry as it starts, and the run ends
    CANCELED. Dagster's own cancellation thread sends one interrupt only, hence this one. Off the
    main thread (runs side by side in a Celery threads pool), which signals never reach, the run
    is marked for `raise_if_canceling`, and its steps stop themselves. The thread ends with the run."""
    from dagster import DagsterRunStatus, RunsFilter

    on_main_thread = threading.current_thread() is threading.main_thread()
    canceling = RunsFilter(run_ids=[run_id], statuses=[DagsterRunStatus.CANCELING])
    ended = threading.Event()

    def watch() -> None:
        while not ended.wait(instance.cancellation_thread_poll_interval_seconds):
            # ids only: 100 runs of a threads pool ask every 2 s, and most are not CANCELING
            if instance.get_run_ids(canceling, limit=1):
                if on_main_thread:
                    os.kill(os.getpid(), signal.SIGINT)
                else:
                    _canceling.add(run_id)

    watcher = threading.Thread(target=watch, name=f"interrupt-on-cancel-{run_id[:8]}", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        ended.set()
        watcher.join()
        _canceling.discard(run_id)
