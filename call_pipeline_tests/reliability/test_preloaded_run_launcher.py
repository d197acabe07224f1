"""The embedded default's run launcher (`instance.PreloadedRunLauncher`, the project's
dagster.yaml), through `call-pipeline serve --no-ui` as a user starts it: each run is a process
forked from the daemon's preloaded server, never a `dagster api execute_run` process spawned by a
code server; what Dagster gives the operator (Terminate, run monitoring, run retries from failure)
still holds. The launcher's health rule is checked on its own against real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import dagster as dg
import psutil
import pytest
import yaml
from dagster._core.launcher import WorkerStatus

from call_pipeline.crm.database import PROJECT_ROOT
from call_pipeline.instance import RUN_PROCESS_TAG, PreloadedRunLauncher
from call_pipeline.run_status import SYNC_JOB_NAME
from call_pipeline_tests.reliability import scenarios
from call_pipeline_tests.reliability.harness import event_messages, pipeline_env_vars, subprocess_env
from call_pipeline_tests.reliability.invariant import assert_matches_clean_run, normalized
from call_pipeline_tests.reliability.test_database_faults import follow_up_count
from call_pipeline_tests.reliability.test_run_launcher import run_pid
from call_pipeline_tests.serve_harness import Served, wait_until

# Run monitoring asks every 120 s by default; the tests ask sooner, nothing else changes.
MONITORING_POLL_S = 3


def _run(tags: dict[str, str]) -> dg.DagsterRun:
    return dg.DagsterRun(job_name=SYNC_JOB_NAME, run_id=str(uuid.uuid4()), tags=tags)


def _where(pid: int, host: str | None = None, started: float | None = None) -> dict[str, str]:
    started = psutil.Process(pid).create_time() if started is None else started
    return {RUN_PROCESS_TAG: f"{host or socket.gethostname()}:{pid}:{started}"}


def test_a_runs_health_is_whether_its_own_process_lives():
    """RUNNING while the process named by the run's tag lives; FAILED once it is gone, or when
    its pid now belongs to a later process; UNKNOWN without a tag or on another host."""
    launcher = PreloadedRunLauncher()
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tags = _where(process.pid)
        assert launcher.check_run_worker_health(_run(tags)).status == WorkerStatus.RUNNING
        later = launcher.check_run_worker_health(_run(_where(process.pid, started=time.time() - 3600)))
        assert later.status == WorkerStatus.FAILED
        assert f"pid {process.pid}" in later.msg
        elsewhere = launcher.check_run_worker_health(_run(_where(process.pid, host="another-machine")))
        assert elsewhere.status == WorkerStatus.UNKNOWN
        assert launcher.check_run_worker_health(_run({})).status == WorkerStatus.UNKNOWN
    finally:
        process.kill()
        process.wait()
    assert launcher.check_run_worker_health(_run(tags)).status == WorkerStatus.FAILED


# -- through serve -----------------------------------------------------------------------------


def _home(path: Path) -> Path:
    config = yaml.safe_load((PROJECT_ROOT / "dagster.yaml").read_text(encoding="utf-8"))
    assert config["run_launcher"]["class"] == "PreloadedRunLauncher"
    config["run_monitoring"]["poll_interval_seconds"] = MONITORING_POLL_S
    path.mkdir(parents=True)
    (path / "dagster.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    # The SQLite storage is made here, before serve and the test open it side by side: two
    # processes making it at once can both stamp its schema (alembic: "more than one head").
    dg.DagsterInstance.from_config(str(path)).dispose()
    return path


def _served(tmp_path: Path, mariadb_url: str, simulator, **extra: str) -> Served:
    home = _home(tmp_path / "dagster_home")
    env = subprocess_env(pipeline_env_vars(mariadb_url, simulator, max_concurrency=1), dagster_home=home,
                         PYTHONUNBUFFERED="1", CALL_PIPELINE_SENSOR_TICK_SECONDS="5",
                         CALL_PIPELINE_STATE_DIR=str(tmp_path / "limits"), **extra)
    return Served([sys.executable, "-m", "call_pipeline.cli", "serve", "--no-ui"], env, tmp_path, home)


def _sync_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    return list(instance.get_runs(filters=dg.RunsFilter(job_name=SYNC_JOB_NAME)))


def _wait_for_run(served: Served, instance: dg.DagsterInstance, find, what: str, timeout_s: float = 240):
    def found():
        served.running()
        return find(_sync_runs(instance))

    try:
        return wait_until(found, timeout_s, what)
    except AssertionError as timed_out:
        seen = [(r.run_id[:8], r.status.value, r.tags.get("dagster/parent_run_id"), r.tags.get("dagster/will_retry"))
                for r in _sync_runs(instance)]
        raise AssertionError(f"{timed_out}: {seen}\n{_retry_daemon_state(instance)}\n{served.log()[-4000:]}") from None


def _retry_daemon_state(instance: dg.DagsterInstance) -> str:
    """Where the daemon's run-retry consumer stands against the run failures in the event log: what
    a retry that never came is to be read from (it found the race between Dagster's failure event
    and the run's record that `call_pipeline.daemon.retry_runs_whose_record_lags_their_failure` closes)."""
    storage = instance.event_log_storage
    cursors = instance.daemon_cursor_storage.get_cursor_values(
        {f"EVENT_LOG_CONSUMER_CURSOR-{t.value}" for t in (dg.DagsterEventType.RUN_FAILURE,
                                                           dg.DagsterEventType.RUN_SUCCESS)})
    failures = storage.get_logs_for_all_runs_by_log_id(after_cursor=-1,
                                                       dagster_event_type={dg.DagsterEventType.RUN_FAILURE})
    return (f"retry consumer's cursors {cursors}; the event log's last id {storage.get_maximum_record_id()}; "
            f"run failures by id {[(i, e.run_id[:8]) for i, e in failures.items()]}")


def _forked_by_the_daemon(pid: int) -> None:
    """The run's process is a child of the daemon's forkserver: not a code server's, not spawned."""
    process = psutil.Process(pid)
    server = process.parent()
    assert "multiprocessing.forkserver" in " ".join(server.cmdline()), server.cmdline()
    assert "call_pipeline.definitions" in " ".join(server.cmdline())  # preloaded
    assert "call_pipeline.daemon run" in " ".join(server.parent().cmdline())
    assert "execute_run" not in " ".join(process.cmdline())


@pytest.mark.slow
def test_a_sensor_run_and_its_steps_run_in_a_process_forked_from_the_daemon(
        mariadb_url, simulator, clean_run, tmp_path):
    """The sensor's first sync, on the multiprocess executor (sized as big: its step processes come
    from a forkserver the run process starts): the run process is the preloaded server's child,
    it starts step processes (it is not daemonic), and the CRM ends as a clean run's."""
    scenario = scenarios.mixed(task_id=7610, n_leads=40, seed=101)
    clean = clean_run(scenario)
    scenario.install(mariadb_url, simulator)
    simulator.state.set_latency(dashscope_ms=300)
    with _served(tmp_path, mariadb_url, simulator, CALL_PIPELINE_IN_PROCESS_MAX_JOBS="0") as served, \
            dg.DagsterInstance.from_config(str(served.home)) as instance:
        running = _wait_for_run(served, instance, lambda runs: next(
            (r for r in runs if r.status == dg.DagsterRunStatus.STARTED and RUN_PROCESS_TAG in r.tags), None),
            "the sensor's run to start")
        pid = int(running.tags[RUN_PROCESS_TAG].split(":")[1])
        _forked_by_the_daemon(pid)
        wait_until(lambda: any("multiprocessing.forkserver" in " ".join(child.cmdline())
                               for child in psutil.Process(pid).children()), 60, "the run's step forkserver")
        done = _wait_for_run(served, instance, lambda runs: next(
            (r for r in runs if r.run_id == running.run_id and r.is_finished), None), "the run to finish")
        assert done.status == dg.DagsterRunStatus.SUCCESS, event_messages(instance, [done.run_id])[-20:]
        assert run_pid(instance, done.run_id) == pid
        step_pids = {e.dagster_event.pid for e in instance.all_logs(
            done.run_id, of_type=dg.DagsterEventType.STEP_WORKER_STARTED)}
        assert step_pids and pid not in step_pids  # the steps ran in processes of their own
    assert_matches_clean_run(normalized(mariadb_url, scenario.task_id), clean)


@pytest.mark.slow
def test_a_killed_run_process_is_failed_and_retried_and_a_terminated_run_is_canceled(
        mariadb_url, simulator, clean_run, tmp_path):
    """The sensor's run's process is SIGKILLed in the middle of step 5: run monitoring finds it
    gone and fails the run, and the daemon's run retry (from failure, through the same launcher)
    finishes the task as a clean run would, no follow-up twice. Then Terminate (what the UI's
    button calls: the instance's launcher, here from another process) in the middle of another
    task's step 5: the run process interrupts its run, which ends CANCELED soon, with follow-ups
    still to write."""
    killed_task = scenarios.mixed(task_id=7620, n_leads=60, seed=102)
    terminated_task = scenarios.mixed(task_id=7621, n_leads=30, leads_id_offset=1000, seed=103)
    clean = clean_run(killed_task)
    other_follow_ups = sum(1 for lead in clean_run(terminated_task)["leads"].values() if lead["follow_up"])
    killed_task.install(mariadb_url, simulator)
    expected = sum(1 for lead in clean["leads"].values() if lead["follow_up"])
    simulator.state.set_latency(dashscope_ms=1000)
    with _served(tmp_path, mariadb_url, simulator) as served, \
            dg.DagsterInstance.from_config(str(served.home)) as instance:
        wait_until(lambda: served.running() and follow_up_count(mariadb_url) >= 2, 180, "the first follow-ups")
        [killed] = [r for r in _sync_runs(instance) if r.status == dg.DagsterRunStatus.STARTED]
        pid = run_pid(instance, killed.run_id)
        _forked_by_the_daemon(pid)
        os.kill(pid, signal.SIGKILL)
        assert follow_up_count(mariadb_url) < expected
        simulator.state.set_latency(dashscope_ms=0)
        failed = _wait_for_run(served, instance, lambda runs: next(
            (r for r in runs if r.run_id == killed.run_id and r.is_finished), None), "the killed run")
        assert failed.status == dg.DagsterRunStatus.FAILURE
        failure = "\n".join(e.message or "" for e in instance.all_logs(
            failed.run_id, of_type=dg.DagsterEventType.RUN_FAILURE))
        assert f"The run's process (pid {pid} on {socket.gethostname()}) is gone" in failure, failure
        retry = _wait_for_run(served, instance, lambda runs: next(
            (r for r in runs if r.tags.get("dagster/parent_run_id") == failed.run_id and r.is_finished), None),
            "the retry")
        assert retry.status == dg.DagsterRunStatus.SUCCESS
        assert retry.tags["dagster/retry_number"] == "1"
        assert run_pid(instance, retry.run_id) != pid
        assert_matches_clean_run(normalized(mariadb_url, killed_task.task_id), clean)
        assert follow_up_count(mariadb_url) == expected

        simulator.state.set_latency(dashscope_ms=1000)
        terminated_task.install(mariadb_url, simulator)
        wait_until(lambda: served.running() and follow_up_count(mariadb_url) >= expected + 1, 180,
                   "the other task's first follow-up")
        [running] = [r for r in _sync_runs(instance) if r.status == dg.DagsterRunStatus.STARTED]
        assert instance.run_launcher.terminate(running.run_id)
        asked = time.monotonic()
        canceled = _wait_for_run(served, instance, lambda runs: next(
            (r for r in runs if r.run_id == running.run_id and r.is_finished), None), "the terminated run", 120)
        assert canceled.status == dg.DagsterRunStatus.CANCELED, canceled.status
        assert time.monotonic() - asked < 30  # the run's own interrupt, not monitoring's cancel timeout
        at_cancel = follow_up_count(mariadb_url)
        time.sleep(3)
        assert follow_up_count(mariadb_url) == at_cancel  # nothing of the canceled run goes on
        assert at_cancel - expected < other_follow_ups
