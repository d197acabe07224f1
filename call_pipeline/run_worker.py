"""What a run worker does with a run, whichever launcher handed it over: execute it on the
worker's instance (Dagster's own run body, as `dagster api execute_run` does) and, while the run
is CANCELING, interrupt it until it has ended.

Two run workers use it: a Celery run task (`celery_app.execute_job`, the production shape) and a
run process forked from the launcher's preloaded server (`instance.PreloadedRunLauncher`, the
embedded default)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)


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


class _CancelWatch:
    """One thread per process and instance that asks, every poll interval, which of the process's
    runs are CANCELING, in one query for them all (100 runs of a threads pool asking each for
    itself made 50 queries a second). It starts with the first run and ends as the last one ends:
    it outlives no run. A run on the process's main thread is sent an interrupt; a run off it is
    marked for `raise_if_canceling`. Hand-written: Dagster's own cancellation thread serves only a
    run that owns its process. Its state is guarded by the module's `_lock`."""

    def __init__(self, instance: Any) -> None:
        self.instance = instance
        self.runs: dict[str, bool] = {}  # run id -> runs on the main thread
        self.canceling: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="interrupt-on-cancel", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        from dagster import DagsterRunStatus, RunsFilter

        while not self._stop.wait(self.instance.cancellation_thread_poll_interval_seconds):
            with _lock:
                runs = dict(self.runs)
            if not runs:
                continue
            try:
                found = self.instance.get_run_ids(RunsFilter(run_ids=list(runs),
                                                             statuses=[DagsterRunStatus.CANCELING]))
            except Exception as exc:  # noqa: BLE001 - the storage unreachable for a moment: ask again next poll
                log.warning("could not read which runs are being terminated: %s: %s", type(exc).__name__, exc)
                continue
            with _lock:
                running = [run_id for run_id in found if run_id in self.runs]  # not ended meanwhile
                self.canceling.update(run_id for run_id in running if not self.runs[run_id])
                interrupt = any(self.runs[run_id] for run_id in running)
            if interrupt:
                os.kill(os.getpid(), signal.SIGINT)


_lock = threading.Lock()
_watches: dict[int, _CancelWatch] = {}  # by id() of the instance, while it has runs here


def raise_if_canceling(run_id: str) -> None:
    """Raises Dagster's interrupt when the run `run_id`, run off this process's main thread, is
    CANCELING. A step calls it as it starts and between the batches it writes: raised from an op,
    the interrupt is not turned into a retry (it is no `Exception`), so the step fails as
    interrupted and the run ends CANCELED; what was written stays."""
    if any(run_id in watch.canceling for watch in list(_watches.values())):
        from dagster._core.errors import DagsterExecutionInterruptedError

        raise DagsterExecutionInterruptedError(f"run {run_id} was terminated")


@contextmanager
def interrupted_while_canceling(instance: Any, run_id: str) -> Iterator[None]:
    """While the run is CANCELING (the UI's Terminate, through the project's launchers), stop it,
    asking every `run_monitoring.cancellation_thread_poll_interval_seconds` until the run has
    ended (`_CancelWatch`). On the process's main thread the stop is an interrupt, sent again at
    each poll: Dagster turns an interrupt inside an op that has a retry policy (ours all do) into
    a retry of the step; the next interrupt, taken between steps, stops the retry as it starts,
    and the run ends CANCELED. Dagster's own cancellation thread sends one interrupt only, hence
    this one. Off the main thread (runs side by side in a Celery threads pool), which signals
    never reach, the run is marked for `raise_if_canceling`, and its steps stop themselves."""
    with _lock:
        watch = _watches.get(id(instance))
        if watch is None:
            watch = _watches[id(instance)] = _CancelWatch(instance)
        watch.runs[run_id] = threading.current_thread() is threading.main_thread()
    try:
        yield
    finally:
        with _lock:
            del watch.runs[run_id]
            watch.canceling.discard(run_id)
            last = not watch.runs
            if last:
                del _watches[id(instance)]  # a run from now on starts a new watch
        if last:
            watch.stop()
