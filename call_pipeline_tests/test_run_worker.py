"""run_worker: what a run worker adds to Dagster's run body, tested on a real instance."""

from __future__ import annotations

import sys
import threading
import time
import traceback

import dagster as dg
import pytest
from dagster._core.errors import DagsterExecutionInterruptedError

from call_pipeline import run_worker
from call_pipeline_tests.pipeline_harness import project_instance_for_test


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
    with project_instance_for_test(overrides={"concurrency": {"pools": {"default_limit": 1}}}) as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots("call_pipeline_test_pool", 1)
        assert storage.claim_concurrency_slot("call_pipeline_test_pool", "another-run", "its-step").is_claimed
        results: list[dg.ExecuteInProcessResult | BaseException] = []

        def run() -> None:
            try:
                results.append(_pooled_job.execute_in_process(instance=instance))
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                results.append(exc)

        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        time.sleep(0.5)  # the run is set up and its step asks for the slot
        cpu_before = time.process_time()
        time.sleep(3.0)
        cpu_waiting = time.process_time() - cpu_before
        assert runner.is_alive()  # still waiting for the slot
        storage.free_concurrency_slots_for_run("another-run")
        runner.join(timeout=60)
        frame = sys._current_frames().get(runner.ident) if runner.is_alive() else None  # noqa: SLF001
        assert frame is None, "the run still waits 60 s after the slot was freed:\n" + "".join(
            traceback.format_stack(frame))
        assert results and not isinstance(results[0], BaseException), results
        assert results[0].success
    assert cpu_waiting < 1.0, f"{cpu_waiting:.2f} s of CPU in 3 s of waiting for a slot"


def _watchers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "interrupt-on-cancel"]


def test_runs_off_the_main_thread_share_one_watcher_and_only_the_canceling_one_is_interrupted(tmp_path):
    """Two runs in worker threads (as on a Celery threads pool): one watcher thread asks for both;
    `raise_if_canceling` stays silent for each until its own run is CANCELING, then raises
    Dagster's interrupt (which no op's retry policy turns into a retry: it is no Exception); the
    other run is not touched; the watcher ends with the last run and nothing stays marked."""
    with project_instance_for_test(temp_dir=str(tmp_path)) as instance:
        terminated, kept = instance.create_run_for_job(_pooled_job), instance.create_run_for_job(_pooled_job)
        both_in, release = threading.Barrier(3), threading.Event()
        seen: dict[str, BaseException | None] = {}

        def run(run_id: str) -> None:
            with run_worker.interrupted_while_canceling(instance, run_id):
                run_worker.raise_if_canceling(run_id)  # not CANCELING: no interrupt
                both_in.wait()
                deadline = time.monotonic() + 30
                try:
                    while time.monotonic() < deadline and not (run_id == kept.run_id and release.is_set()):
                        run_worker.raise_if_canceling(run_id)
                        time.sleep(0.05)
                    seen[run_id] = None
                except DagsterExecutionInterruptedError as interrupt:
                    seen[run_id] = interrupt
                    release.set()

        threads = [threading.Thread(target=run, args=(r.run_id,)) for r in (terminated, kept)]
        for thread in threads:
            thread.start()
        both_in.wait()
        assert len(_watchers()) == 1
        instance.report_run_canceling(terminated)
        for thread in threads:
            thread.join(timeout=60)
        assert isinstance(seen[terminated.run_id], DagsterExecutionInterruptedError)
        assert not isinstance(seen[terminated.run_id], Exception)
        assert seen[kept.run_id] is None
        assert _watchers() == []
        run_worker.raise_if_canceling(terminated.run_id)  # the run ended: no longer marked


class _StorageOnceUnreachable:
    """The instance, whose first question about terminated runs fails as a lost connection would."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        self._instance, self.failed = instance, 0

    def __getattr__(self, name: str):
        return getattr(self._instance, name)

    def get_run_ids(self, *args, **kwargs):
        if not self.failed:
            self.failed += 1
            raise ConnectionError("Lost connection to MySQL server during query")
        return self._instance.get_run_ids(*args, **kwargs)


def test_a_failed_poll_does_not_end_the_watch(tmp_path, caplog):
    with project_instance_for_test(temp_dir=str(tmp_path)) as real:
        instance = _StorageOnceUnreachable(real)
        run = real.create_run_for_job(_pooled_job)
        real.report_run_canceling(run)
        seen: list[BaseException] = []

        def in_a_worker_thread() -> None:
            with run_worker.interrupted_while_canceling(instance, run.run_id):
                deadline = time.monotonic() + 30
                try:
                    while time.monotonic() < deadline:
                        run_worker.raise_if_canceling(run.run_id)
                        time.sleep(0.05)
                except DagsterExecutionInterruptedError as interrupt:
                    seen.append(interrupt)

        thread = threading.Thread(target=in_a_worker_thread)
        thread.start()
        thread.join(timeout=60)
        assert instance.failed == 1 and seen
        assert "could not read which runs are being terminated: ConnectionError" in caplog.text


@pytest.fixture(autouse=True)
def _fast_cancel_poll(monkeypatch):
    monkeypatch.setattr(dg.DagsterInstance, "cancellation_thread_poll_interval_seconds", property(lambda _self: 0.2))
