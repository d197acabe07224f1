"""The production shape with real processes, as `serve` starts it: dagster-daemon on a MariaDB
instance (deploy/dagster.yaml: queued runs, run retries, run monitoring) and dagster-webserver
where a test uses the UI's API (`production(ui=...)`), the celery executor with
RabbitMQ as broker and Redis for results and for the shared limits, step outputs in an
S3-compatible bucket (moto's server), and two Celery workers, each with a home folder and a state
folder of its own (as on two machines): one on sync_queue,query_queue, one on
download_queue,ai_queue; runs are Celery tasks (CeleryRunLauncher) run by a third worker on the
queue `runs`. The sensor launches the runs of two tasks through the daemon."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import requests
import yaml
from celery import Celery

from call_pipeline.instance import create_pools
from call_pipeline.run_status import SYNC_JOB_NAME
from call_pipeline.serve import plan_services, read_instance_config, write_workspace
from call_pipeline_tests.reliability import scenarios
from call_pipeline_tests.reliability.harness import PROJECT_ROOT, pipeline_env_vars, subprocess_env
from call_pipeline_tests.reliability.invariant import assert_matches_clean_run, normalized

RESULT_BACKEND = "redis://127.0.0.1:6379/0"
QUEUES_OF = {"sync-query": "sync_queue,query_queue", "download-ai": "download_queue,ai_queue"}
RUNS_WORKER = "runs"
WORKER_OF_QUEUE = {"sync_queue": "sync-query", "query_queue": "sync-query", "download_queue": "download-ai",
                   "ai_queue": "download-ai"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _home(path: Path, overrides: dict | None = None) -> Path:
    """A DAGSTER_HOME with deploy/dagster.yaml, its sections updated by `overrides` (one level deep:
    {"concurrency": {"runs": {...}}} replaces `concurrency.runs`)."""
    path.mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / "deploy" / "dagster.yaml", path / "dagster.yaml")
    if overrides:
        config = yaml.safe_load((path / "dagster.yaml").read_text(encoding="utf-8"))
        for section, values in overrides.items():
            config[section] = {**config.get(section, {}), **values}
        (path / "dagster.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


class Processes:
    """Started in process groups of their own, stopped together (and killed if they linger)."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.running = logs, {}
        self.webserver_url = ""

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(command, env=env, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.running[name] = (proc, log)
        return proc

    def check_alive(self, skip: tuple[str, ...] = ()) -> None:
        for name, (proc, _) in self.running.items():
            assert name in skip or proc.poll() is None, f"{name} exited: {self.output(name)[-3000:]}"

    def output(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for proc, _ in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc, log in self.running.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.close()


@contextlib.contextmanager
def production(tmp_path: Path, mariadb_url: str, simulator, broker_url: str, redis_prefix: str,
               dagster_mysql_env: dict, s3, runs_concurrency: int = 8, runs_pool: str = "threads",
               instance_overrides: dict | None = None, ui: bool = True, runs_workers: int = 1, **extra_env: str):
    """The daemon, the webserver (unless `ui` is false: `serve --no-ui`), the run worker (a threads
    pool, as `serve` starts it; its threads fewer than serve's; `runs_workers` of them: the first
    named RUNS_WORKER, the others RUNS_WORKER-1...) and, on the celery executor, the two step
    workers (the workers `serve` starts for the instance) up; yields (instance, processes, env).
    `instance_overrides`: changes to deploy/dagster.yaml (`_home`)."""
    bucket = s3.new_bucket()
    env = subprocess_env(pipeline_env_vars(mariadb_url, simulator, **extra_env.pop("knobs", {})),
                         dagster_home=tmp_path / "unused", **{
        **dagster_mysql_env,
        "CALL_PIPELINE_EXECUTOR": "celery",
        "CALL_PIPELINE_CELERY_BROKER": broker_url, "CALL_PIPELINE_CELERY_BACKEND": RESULT_BACKEND,
        "CALL_PIPELINE_REDIS_URL": RESULT_BACKEND, "CALL_PIPELINE_REDIS_KEY_PREFIX": redis_prefix,
        "CALL_PIPELINE_IO_STORE": f"s3://{bucket}/steps", "CALL_PIPELINE_IO_S3_ENDPOINT": s3.endpoint,
        "AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1",
        "CALL_PIPELINE_SENSOR_TICK_SECONDS": "5", **extra_env,
    })
    ops_home = _home(tmp_path / "ops_home", instance_overrides)
    os.environ.update(dagster_mysql_env)
    instance = None
    processes = Processes(tmp_path)
    try:
        # the schema and the pools, once, before the processes that share them start (as `serve` does)
        instance = dg.DagsterInstance.from_config(str(ops_home))
        create_pools(instance)
        port, code_port = _free_port(), _free_port()
        ops_env = {**env, "DAGSTER_HOME": str(ops_home)}
        # One code server for the daemon and the webserver, with serve's commands: started alone,
        # each would spawn its own and the daemon a new one every minute.
        services = {service.name: service.command for service in plan_services(
            read_instance_config(ops_home), ops_env, ui=ui, host="127.0.0.1", port=port, code_port=code_port,
            workspace=write_workspace(tmp_path / "workspace.yaml", code_port), cpus=1)}
        processes.start("code-server", list(services["code server"]), ops_env)
        # the workers need no code server: they import the project while it does
        step_workers = tuple(QUEUES_OF) if env["CALL_PIPELINE_EXECUTOR"] == "celery" else ()
        for name in step_workers:
            start_worker(processes, env, tmp_path, name, overrides=instance_overrides)
        suffixes = ["", *(f"-{i}" for i in range(1, runs_workers))]
        for suffix in suffixes:
            start_worker(processes, env, tmp_path, RUNS_WORKER, suffix=suffix, overrides=instance_overrides,
                         concurrency=runs_concurrency, pool=runs_pool)
        workers = (*step_workers, *(RUNS_WORKER + suffix for suffix in suffixes))
        _wait_for(lambda: socket.create_connection(("127.0.0.1", code_port), timeout=1).close() is None, 120,
                  "the code server")
        processes.start("daemon", list(services["dagster-daemon"]), ops_env)
        if ui:
            processes.start("webserver", list(services["dagster-webserver"]), ops_env)
        processes.check_alive()
        _wait_for_workers(broker_url, [f"{name}@localhost" for name in workers])
        if ui:
            processes.webserver_url = f"http://127.0.0.1:{port}"
            _wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/server_info", timeout=2).ok, 120,
                      "the webserver")
        yield instance, processes, env
    finally:
        processes.stop()
        if instance is not None:
            instance.dispose()
        for name in dagster_mysql_env:
            os.environ.pop(name, None)


def start_worker(processes: Processes, env: dict, tmp_path: Path, name: str, suffix: str = "",
                 concurrency: int = 2, pool: str = "prefork", overrides: dict | None = None) -> None:
    home = _home(tmp_path / f"{name}{suffix}_home", overrides)
    queues = QUEUES_OF.get(name, name)
    processes.start(name + suffix, [sys.executable, "-m", "call_pipeline.cli", "worker", "--queues", queues,
                                    "--concurrency", str(concurrency), "--pool", pool,
                                    "--name", f"{name}{suffix}@localhost"],
                    {**env, "DAGSTER_HOME": str(home), "CALL_PIPELINE_STATE_DIR": str(home / "limits")})


@pytest.mark.slow
def test_the_sensor_runs_two_tasks_through_the_daemon_on_two_celery_workers(
        mariadb_url, simulator, clean_run, broker_url, redis_prefix, dagster_mysql_env, s3, aws_test_credentials,
        tmp_path):
    tasks = [scenarios.mixed(task_id=7400 + i, n_leads=40, leads_id_offset=2000 * i, seed=80 + i) for i in range(2)]
    cleans = {s.task_id: clean_run(s) for s in tasks}
    for scenario in tasks:
        scenario.install(mariadb_url, simulator)
    with production(tmp_path, mariadb_url, simulator, broker_url, redis_prefix, dagster_mysql_env, s3,
                    ui=False) as (instance, processes, _):
        runs = _wait_for_runs(instance, [s.task_id for s in tasks], processes)
        ran_on = {}
        for run in runs:
            assert run.tags["call_pipeline/task_name"]
            for entry in instance.all_logs(run.run_id):
                event = entry.dagster_event
                if event and event.event_type_value == "ENGINE_EVENT" and \
                        "in celery worker" in (entry.message or ""):
                    ran_on[(run.run_id, event.step_key)] = event.engine_event_data.metadata["Celery worker"].value
        succeeded = {(r.run_id, e.step_key) for r in runs for e in instance.all_logs(r.run_id)
                     if e.dagster_event and e.dagster_event.is_step_success}

    assert succeeded and set(ran_on) >= succeeded
    from call_pipeline.definitions import defs

    queue_of = {node.name: node.definition.tags["dagster-celery/queue"]
                for node in defs.resolve_job_def(SYNC_JOB_NAME).graph.node_dict.values()}
    for (_, step_key), worker in ran_on.items():
        expected = WORKER_OF_QUEUE[queue_of[step_key.split("[")[0]]]
        assert worker == f"{expected}@localhost", (step_key, worker)
    assert set(ran_on.values()) == {f"{name}@localhost" for name in QUEUES_OF}
    for scenario in tasks:
        assert_matches_clean_run(normalized(mariadb_url, scenario.task_id), cleans[scenario.task_id])
    stats = simulator.state.stats()
    llm = sum(1 for clean in cleans.values() for lead in clean["leads"].values()
              if lead["follow_up"] in ("llm", "ai_fallback"))
    assert stats["dashscope_requests"] == llm  # no LLM call twice
    assert stats["download_recording_repeats"] == 0 and stats["throttled"] == 0


# A killed worker's LLM slots stay taken in Redis until their leases run out; the production
# lease (30 s) would be most of a killed-worker test's time, so those tests take a short one
# (renewed every 2.7 s: far more often than a live holder can stall here).
SHORT_LEASE = {"CALL_PIPELINE_REDIS_LEASE_SECONDS": "8"}


@pytest.mark.slow
def test_a_worker_killed_in_the_middle_of_a_step(mariadb_url, simulator, clean_run, broker_url, redis_prefix,
                                                dagster_mysql_env, s3, aws_test_credentials, tmp_path):
    """The download-ai worker is SIGKILLed while its step-5 step writes follow-ups; a new worker
    on those queues is started. The step's task is delivered again (late acknowledgement) or the
    run is retried by the daemon; the task ends as a clean run's, no lead with two follow-ups."""
    from call_pipeline_tests.reliability.test_database_faults import follow_up_count

    scenario = scenarios.mixed(task_id=7410, n_leads=60, seed=90)
    clean = clean_run(scenario)
    scenario.install(mariadb_url, simulator)
    expected = sum(1 for lead in clean["leads"].values() if lead["follow_up"])
    simulator.state.set_latency(dashscope_ms=300)
    with production(tmp_path, mariadb_url, simulator, broker_url, redis_prefix, dagster_mysql_env, s3,
                    ui=False, knobs={"max_concurrency": 2}, **SHORT_LEASE) as (instance, processes, env):
        _wait_for(lambda: follow_up_count(mariadb_url) >= 3, 180, "the first follow-ups")
        written = follow_up_count(mariadb_url)
        proc, _ = processes.running["download-ai"]
        os.killpg(proc.pid, signal.SIGKILL)
        assert written < expected
        simulator.state.set_latency(dashscope_ms=0)
        start_worker(processes, env, tmp_path, "download-ai", suffix="-2")
        runs = _wait_for_runs(instance, [scenario.task_id], processes, allow_failed=True, skip=("download-ai",))
    assert runs
    assert_matches_clean_run(normalized(mariadb_url, scenario.task_id), clean)
    assert follow_up_count(mariadb_url) == expected  # nothing written twice, nothing half-written


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(Exception):
            if condition():
                return
        assert time.monotonic() < deadline, f"{what} did not come up within {timeout_s:.0f} s"
        time.sleep(0.5)


def _wait_for_workers(broker: str, names: list[str], timeout_s: float = 120.0) -> None:
    app = Celery(broker=broker, backend=RESULT_BACKEND)
    try:
        _wait_for(lambda: {n for reply in app.control.ping(timeout=1.0) or [] for n in reply} >= set(names),
                  timeout_s, "the workers")
    finally:
        app.close()


def _failure_report(instance: dg.DagsterInstance, failed: list, processes: Processes) -> str:
    """What a failed run's event log and the workers' output say about why it failed."""
    lines = []
    for run in failed:
        for entry in instance.all_logs(run.run_id):
            event = entry.dagster_event
            if event and (event.is_failure or event.event_type_value in ("RUN_FAILURE", "ENGINE_EVENT")):
                error = getattr(event.event_specific_data, "error", None)
                lines.append(f"{run.run_id[:8]} {event.event_type_value} {event.step_key or ''}: "
                             f"{entry.message} {error.to_string() if error else ''}")
    outputs = {name: processes.output(name)[-2000:] for name in processes.running}
    return "\n".join(lines) + "".join(f"\n--- {name}:\n{text}" for name, text in outputs.items())


def _wait_for_runs(instance: dg.DagsterInstance, task_ids: list[int], processes: Processes,
                   timeout_s: float = 300.0, allow_failed: bool = False, skip: tuple[str, ...] = ()) -> list:
    """The runs the sensor launched for the tasks, once each task has a successful one."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = instance.get_runs(filters=dg.RunsFilter(job_name=SYNC_JOB_NAME))
        done = {run.tags.get("dagster/partition") for run in runs if run.status == dg.DagsterRunStatus.SUCCESS}
        if {str(t) for t in task_ids} <= done:
            return [run for run in runs if run.status == dg.DagsterRunStatus.SUCCESS]
        processes.check_alive(skip)
        failed = [run for run in runs if run.status == dg.DagsterRunStatus.FAILURE]
        assert allow_failed or not failed, _failure_report(instance, failed, processes)
        assert time.monotonic() < deadline, (
            f"runs: {[(r.tags.get('dagster/partition'), r.status.value) for r in runs]}\\n"
            + processes.output("daemon")[-3000:])
        time.sleep(1.0)
