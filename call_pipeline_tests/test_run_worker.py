"""run_worker: what a run worker adds to Dagster's run body, tested on a real instance."""

from __future__ import annotations

import threading
import time

import dagster as dg
import pytest
from dagster._core.errors import DagsterExecutionInterruptedError

from call_pipeline import run_worker


@dg.op(pool="call_pipeline_test_pool")
def _pooled() -> int:
    return 1


@dg.job
def _pooled_job() -> None:
    _pooled()


def test_a_run_whose_step_waits_for_its_pool_sleeps_instead_of_spinning():
    """The pool's only slot is held by another run for 3 s: the in-process run waits for it. With
    Dagster's own interval (always 0) the waiting run spins on a core; with the worker's, it
    sleeps until its next claim and then runs."""
    run_worker.sleep_while_a_step_waits_for_its_pool()
    with dg.instance_for_test(overrides={"concurrency": {"pools": {"default_limit": 1}}}) as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots("call_pipeline_test_pool", 1)
        assert storage.claim_concurrency_slot("call_pipeline_test_pool", "another-run", "its-step").is_claimed
        results: list[dg.ExecuteInProcessResult] = []
        runner = threading.Thread(target=lambda: results.append(_pooled_job.execute_in_process(instance=instance)))
        runner.start()
        time.sleep(0.5)  # the run is set up and its step asks for the slot
        cpu_before = time.process_time()
        time.sleep(3.0)
        cpu_waiting = time.process_time() - cpu_before
        assert runner.is_alive()  # still waiting for the slot
        storage.free_concurrency_slots_for_run("another-run")
        runner.join(timeout=60)
        assert results and results[0].success
    assert cpu_waiting < 1.0, f"{cpu_waiting:.2f} s of CPU in 3 s of waiting for a slot"


def test_a_run_off_the_main_thread_is_interrupted_only_once_it_is_canceling(tmp_path):
    """`raise_if_canceling` is what a step of a threads-pool run calls: silent until the run's
    watcher has seen it CANCELING, then Dagster's interrupt (which no op's retry policy turns into
    a retry: it is no Exception); nothing is left marked when the run ends."""
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        run = instance.create_run_for_job(_pooled_job)
        seen: list[BaseException | None] = []

        def in_a_worker_thread() -> None:
            with run_worker.interrupted_while_canceling(instance, run.run_id):
                run_worker.raise_if_canceling(run.run_id)  # not CANCELING: no interrupt
                instance.report_run_canceling(run)
                deadline = time.monotonic() + 30
                try:
                    while time.monotonic() < deadline:
                        run_worker.raise_if_canceling(run.run_id)
                        time.sleep(0.05)
                    seen.append(None)
                except DagsterExecutionInterruptedError as interrupt:
                    seen.append(interrupt)

        thread = threading.Thread(target=in_a_worker_thread)
        thread.start()
        thread.join(timeout=60)
        assert seen and isinstance(seen[0], DagsterExecutionInterruptedError)
        assert not isinstance(seen[0], Exception)
        run_worker.raise_if_canceling(run.run_id)  # the run ended: no longer marked


@pytest.fixture(autouse=True)
def _fast_cancel_poll(monkeypatch):
    monkeypatch.setattr(dg.DagsterInstance, "cancellation_thread_poll_interval_seconds", property(lambda _self: 0.2))
