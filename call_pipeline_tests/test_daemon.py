"""call_pipeline/daemon.py: Dagster's daemon with its code server watched once a minute and its
run-retry consumer reading a failed run's record once it caught up. The daemon itself runs through
it in every test of `serve` (test_serve.py, reliability/test_deployment.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import dagster as dg
import dagster._grpc.server_watcher as server_watcher
import pytest
from dagster._core.utils import make_new_run_id
from dagster._grpc.client import DagsterGrpcClient

from call_pipeline import daemon


class _CountingClient(DagsterGrpcClient):
    """A code server's gRPC client that answers the watch's question itself, and counts it."""

    def __init__(self) -> None:
        super().__init__(port=1, host="127.0.0.1")
        self.asked = 0

    def get_server_id(self, timeout: float | None = None) -> str:
        self.asked += 1
        return "server-1"


def _questions_in(seconds: float) -> int:
    client = _CountingClient()
    shutdown, thread = server_watcher.create_grpc_watch_thread(
        "loc", client, get_location_entry=lambda name: None, refresh_code_location=lambda name: None,
        on_disconnect=lambda name: None, on_reconnected=lambda name: None, on_updated=lambda name, new_id: None,
        on_error=lambda name: None)
    thread.start()
    time.sleep(seconds)
    shutdown.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    return client.asked


def test_the_daemons_watch_asks_its_code_server_once_a_minute_not_every_second(monkeypatch):
    monkeypatch.setattr(server_watcher, "WATCH_INTERVAL", server_watcher.WATCH_INTERVAL)  # restored after
    assert _questions_in(2.5) >= 2  # Dagster's: every second
    daemon.watch_code_servers_less_often()
    assert server_watcher.WATCH_INTERVAL == daemon.WATCH_INTERVAL_S == 60
    assert _questions_in(2.5) == 1  # once on starting, then not within the minute


def test_the_module_is_dagsters_daemon_command():
    help_text = subprocess.run([sys.executable, "-m", "call_pipeline.daemon", "run", "--help"], capture_output=True,
                               text=True, timeout=120, check=True).stdout
    assert "Run any daemons configured on the DagsterInstance" in help_text
    assert "--workspace" in help_text


@pytest.fixture
def retrying_instance(tmp_path):
    """A real instance on SQLite with run retries on, as both dagster.yaml files have them."""
    with dg.DagsterInstance.local_temp(str(tmp_path), overrides={
            "run_retries": {"enabled": True, "max_retries": 2}, "telemetry": {"enabled": False}}) as instance:
        yield instance


def _started_run(instance: dg.DagsterInstance) -> dg.DagsterRun:
    return instance.add_run(dg.DagsterRun(job_name="sync_call_task", run_id=make_new_run_id(),
                                          status=dg.DagsterRunStatus.STARTED))


def test_a_failed_run_read_before_its_record_caught_up_is_retried(retrying_instance, monkeypatch):
    """The consumer is handed a run for its RUN_FAILURE event while the run's record still says
    STARTED (Dagster writes the status and the will-retry tag right after the event): Dagster's own
    filter decides from that record and never retries the run; the daemon's reads the record again
    until it says FAILURE, and retries it."""
    from dagster._daemon.auto_run_reexecution import auto_run_reexecution

    monkeypatch.setattr(auto_run_reexecution, "filter_runs_to_should_retry",
                        auto_run_reexecution.filter_runs_to_should_retry)  # restored after
    dagsters = auto_run_reexecution.filter_runs_to_should_retry
    stale = _started_run(retrying_instance)
    failing = threading.Timer(0.3, retrying_instance.report_run_failed, args=(stale,))
    failing.start()
    try:
        assert list(dagsters([stale], retrying_instance)) == []  # decided on the record as read
        daemon.retry_runs_whose_record_lags_their_failure()
        [retried] = auto_run_reexecution.filter_runs_to_should_retry([stale], retrying_instance)
    finally:
        failing.join()
    assert retried.run_id == stale.run_id
    assert retried.status == dg.DagsterRunStatus.FAILURE
    assert list(dagsters([stale], retrying_instance)) == []  # still no: Dagster keeps the stale record


def test_a_run_whose_record_never_says_finished_is_decided_as_read(retrying_instance):
    started = _started_run(retrying_instance)
    began = time.monotonic()
    [run] = daemon.runs_as_recorded([started], retrying_instance, wait_s=0.3)
    assert run.status == dg.DagsterRunStatus.STARTED
    assert time.monotonic() - began >= 0.3  # read again until the wait ran out


def test_a_finished_run_is_not_read_again(retrying_instance, monkeypatch):
    run = _started_run(retrying_instance)
    retrying_instance.report_run_failed(run)
    failed = retrying_instance.get_run_by_id(run.run_id)
    reads = []
    monkeypatch.setattr(retrying_instance, "get_run_by_id", lambda run_id: reads.append(run_id))
    assert daemon.runs_as_recorded([failed], retrying_instance) == [failed]
    assert reads == []
