"""Every executor gives the same result: the scenario run on the `celery` executor, its steps
executed by a real Celery worker process (RabbitMQ as broker, Redis as result backend), ends as a
clean in-process run does, with every call made once. (The in-process and multiprocess executors
are compared in test_sync_job.py and throughout this suite, which runs on the default executor.)"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest
from celery import Celery

from call_pipeline_tests.reliability import scenarios
from call_pipeline_tests.reliability.harness import (
    PROJECT_ROOT,
    launch_run,
    pipeline_env_vars,
    subprocess_env,
)
from call_pipeline_tests.reliability.invariant import assert_matches_clean_run, normalized

RESULT_BACKEND = "redis://127.0.0.1:6379/0"


def wait_for_worker(broker: str, name: str, worker: subprocess.Popen, timeout_s: float = 90.0) -> None:
    app = Celery(broker=broker, backend=RESULT_BACKEND)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            assert worker.poll() is None, "the worker exited"
            if any(name in reply for reply in app.control.ping(timeout=1.0) or []):
                return
        raise AssertionError(f"worker {name} did not answer within {timeout_s:.0f} s")
    finally:
        app.close()


@pytest.mark.slow
def test_the_celery_executor_with_one_local_worker(mariadb_url, simulator, instance, env, clean_run, broker_url,
                                                   monkeypatch, tmp_path):
    scenario = scenarios.mixed()
    clean = clean_run(scenario)
    scenario.install(mariadb_url, simulator)
    celery_env = {"CALL_PIPELINE_CELERY_BROKER": broker_url, "CALL_PIPELINE_CELERY_BACKEND": RESULT_BACKEND}
    for name, value in celery_env.items():
        monkeypatch.setenv(name, value)
    worker_name = f"test-{uuid.uuid4().hex[:8]}@localhost"
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(
        [sys.executable, "-m", "call_pipeline.cli", "worker", "--queues",
         "sync_queue,query_queue,download_queue,ai_queue", "--concurrency", "2", "--name", worker_name],
        env=subprocess_env({**pipeline_env_vars(mariadb_url, simulator), **celery_env},
                           dagster_home=instance.root_directory),
        cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_worker(broker_url, worker_name, worker)
        result = launch_run(instance, scenario.task_id, executor="celery")
        first = launch_run(instance, scenario.task_id, executor="celery")  # a rerun changes nothing
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        log.close()
    output = (tmp_path / "worker.log").read_text(errors="replace")
    assert result.success, output[-3000:]
    assert first.success

    # every step ran in the worker, and the CRM is a clean run's
    ran_in = {}
    for entry in instance.all_logs(result.run_id):
        event = entry.dagster_event
        if event and event.event_type_value == "ENGINE_EVENT" and "in celery worker" in (entry.message or ""):
            ran_in[event.step_key] = event.engine_event_data.metadata["Celery worker"].value
    succeeded = {e.step_key for e in result.all_events if e.is_step_success}
    assert succeeded and set(ran_in) >= succeeded and set(ran_in.values()) == {worker_name}
    assert any(key.startswith("create_follow_ups[") for key in succeeded)
    assert_matches_clean_run(normalized(mariadb_url, scenario.task_id), clean)
    stats = simulator.state.stats()
    llm = sum(1 for lead in clean["leads"].values() if lead["follow_up"] in ("llm", "ai_fallback"))
    assert stats["dashscope_requests"] == llm
    assert stats["download_recording_repeats"] == 0


@pytest.mark.parametrize("sized", ["in process", "multiprocess"])
def test_the_multiprocess_executor_runs_a_run_asked_in_process_in_its_own_process(
        mariadb_url, simulator, instance, env, clean_run, sized):
    """The sensor's run config for a run with little work (`IN_PROCESS_RUN_CONFIG`) makes the
    multiprocess executor run every step in the run's process; without it, each step has a process
    of its own. Both end as a clean run does."""
    from call_pipeline.executors import IN_PROCESS_RUN_CONFIG
    from call_pipeline_tests.reliability.harness import event_messages

    scenario = scenarios.mixed(task_id=7460, n_leads=20, seed=99)
    clean = clean_run(scenario)
    scenario.install(mariadb_url, simulator)
    result = launch_run(instance, scenario.task_id, executor="multiprocess",
                        extra_config=IN_PROCESS_RUN_CONFIG if sized == "in process" else None)
    assert result.success
    messages = "\n".join(event_messages(instance, [result.run_id]))
    step_processes = messages.count("Launching subprocess for")
    if sized == "in process":
        assert "Executing steps in process" in messages and step_processes == 0
    else:
        assert "Executing steps using multiprocess executor" in messages and step_processes >= 6
    assert_matches_clean_run(normalized(mariadb_url, scenario.task_id), clean)
