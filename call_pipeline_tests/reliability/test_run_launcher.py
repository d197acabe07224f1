"""Runs launched by deploy/dagster.yaml's `CeleryRunLauncher`, in the production shape of
test_deployment.py (daemon and webserver on MariaDB, step workers, RabbitMQ vhost and Redis
prefix of the test's own): each run is a Celery task on the queue `runs`, executed in a pool
process of `call-pipeline worker --queues runs`, never in a `dagster api execute_run` process of
its own; what Dagster gives the operator (run retries, re-execution from failure, run monitoring,
termination) still holds."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import dagster as dg
import pytest
import requests

from call_pipeline.run_status import SYNC_JOB_NAME
from call_pipeline_tests.reliability import scenarios
from call_pipeline_tests.reliability.harness import event_messages
from call_pipeline_tests.reliability.invariant import assert_matches_clean_run, normalized
from call_pipeline_tests.reliability.test_deployment import (
    RUNS_WORKER,
    SHORT_LEASE,
    Processes,
    _wait_for,
    production,
    start_worker,
)

REEXECUTE = """mutation($parentRunId: String!) {
  launchRunReexecution(reexecutionParams: {parentRunId: $parentRunId, strategy: FROM_FAILURE}) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}"""
TERMINATE = """mutation($runId: String!) {
  terminateRun(runId: $runId) { __typename ... on PythonError { message } }
}"""


def graphql(processes: Processes, query: str, **variables: str) -> dict:
    answer = requests.post(f"{processes.webserver_url}/graphql", json={"query": query, "variables": variables},
                           timeout=60)
    answer.raise_for_status()
    return answer.json()["data"]


def pool_processes(worker_pid: int) -> set[int]:
    """The pids of the worker's pool processes (its children)."""
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == worker_pid:
                children.add(int(entry.name))
    return children


def run_pid(instance: dg.DagsterInstance, run_id: str) -> int:
    """The pid of the process that executed the run (Dagster's "Started process for run" event)."""
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        if (entry.message or "").startswith("Started process for run"):
            return int(entry.dagster_event.engine_event_data.metadata["pid"].value)
    raise AssertionError(f"run {run_id} has no 'Started process for run' event")


def assert_ran_in_the_run_worker(instance: dg.DagsterInstance, processes: Processes, run_id: str) -> None:
    workers = [worker.pid for name, (worker, _) in processes.running.items() if name.startswith(RUNS_WORKER)]
    pid = run_pid(instance, run_id)
    # prefork: one of its pool processes; threads or solo: the worker's own process
    assert any(pid in {worker} | pool_processes(worker) for worker in workers), (pid, workers)
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert "celery" in cmdline and "execute_run" not in cmdline, cmdline


def sync_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    return list(instance.get_runs(filters=dg.RunsFilter(job_name=SYNC_JOB_NAME)))


def wait_for_run(instance: dg.DagsterInstance, processes: Processes, find, what: str,
                 timeout_s: float = 300.0, skip: tuple[str, ...] = ()) -> dg.DagsterRun:
    deadline = time.monotonic() + timeout_s
    while True:
        found = find(sync_runs(instance))
        if found is not None:
            return found
        processes.check_alive(skip)
        seen = [(r.run_id[:8], r.status.value, r.tags.get("dagster/parent_run_id")) for r in sync_runs(instance)]
        assert time.monotonic() < deadline, f"{what}: {seen}\n{processes.output('daemon')[-3000:]}"
        time.sleep(1.0)


@pytest.mark.slow
def test_a_run_that_fails_is_retried_and_reexecuted_on_the_run_worker(
        mariadb_url, simulator, clean_run, broker_url, redis_prefix, dagster_mysql_env, s3, aws_test_credentials,
        tmp_path):
    """The sensor's run fails once (a gateway error on listing the group's jobs, no op retry);
    the daemon's run retry goes through the same launcher and succeeds; the failed run re-executed
    from failure (the UI's "from failure", through the webserver) succeeds too. Every run is
    executed in a pool process of the run worker."""
    scenario = scenarios.mixed(task_id=7420, n_leads=30, seed=95)
    clean = clean_run(scenario)
    scenario.install(mariadb_url, simulator)
    simulator.state.inject_fault(action="ListJobsByGroup", status=502, times=1,
                                 raw_body="<html><body>502 Bad Gateway</body></html>")
    with production(tmp_path, mariadb_url, simulator, broker_url, redis_prefix, dagster_mysql_env, s3,
                    CALL_PIPELINE_OP_MAX_RETRIES="0") as (instance, processes, _):
        failed = wait_for_run(instance, processes, lambda runs: next(
            (r for r in runs if r.status == dg.DagsterRunStatus.FAILURE), None), "the failed run")
        retried = wait_for_run(instance, processes, lambda runs: next(
            (r for r in runs if r.tags.get("dagster/parent_run_id") == failed.run_id
             and r.status == dg.DagsterRunStatus.SUCCESS), None), "its retry")
        assert retried.tags["dagster/retry_number"] == "1"
        reexecution = graphql(processes, REEXECUTE, parentRunId=failed.run_id)["launchRunReexecution"]
        assert reexecution["__typename"] == "LaunchRunSuccess", reexecution
        rerun_id = reexecution["run"]["runId"]
        rerun = wait_for_run(instance, processes, lambda runs: next(
            (r for r in runs if r.run_id == rerun_id and r.status.value in ("SUCCESS", "FAILURE")), None),
            "the re-execution")
        assert rerun.status == dg.DagsterRunStatus.SUCCESS
        for run in (failed, retried, rerun):
            assert run.tags["dagster-celery/task_id"]  # launched as a Celery task
            assert_ran_in_the_run_worker(instance, processes, run.run_id)
        assert "502 Bad Gateway" in "\n".join(event_messages(instance, [failed.run_id]))
    assert simulator.state.faults == []
    assert_matches_clean_run(normalized(mariadb_url, scenario.task_id), clean)


# ---- figures ------------------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """CPU of a process, its living descendants and the children they reaped (utime, stime,
    cutime, cstime), in seconds."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0))[1]
        todo += [child for child, (parent, _) in stats.items() if parent == pid]
    return total / CLOCK_TICKS


def workers_cpu(processes: Processes, names: tuple[str, ...]) -> float:
    return sum(tree_cpu_seconds(processes.running[name][0].pid) for name in names)


def submit_run(processes: Processes, task_id: int) -> str:
    from dagster_graphql import DagsterGraphQLClient

    host, port = processes.webserver_url.removeprefix("http://").split(":")
    client = DagsterGraphQLClient(host, port_number=int(port))
    return client.submit_job_execution(SYNC_JOB_NAME, tags={"dagster/partition": str(task_id),
                                                       "call_pipeline/task_name": "figures"})


def wait_for_finished(instance: dg.DagsterInstance, processes: Processes, run_id: str,
                      timeout_s: float = 600.0) -> dg.DagsterRun:
    return wait_for_run(instance, processes, lambda runs: next(
        (r for r in runs if r.run_id == run_id and r.is_finished), None), f"run {run_id}", timeout_s)


def run_wall_seconds(instance: dg.DagsterInstance, run_id: str) -> float:
    record = instance.get_run_record_by_id(run_id)
    return record.end_time - record.start_time


# The suite runs the cases no other test runs: the production shape (in_process on threads), the
# multiprocess executor forking in a threads worker, the celery executor in a prefork pool process.
# In_process in a prefork pool process runs in the killed-worker and terminate tests; its figures
# come with FIGURES_LEADS set (the README's table).
FIGURE_CASES = [("in_process", "threads"), ("multiprocess", "threads"), ("celery", "prefork"),
                *([("in_process", "prefork")] if os.environ.get("FIGURES_LEADS") else [])]


@pytest.mark.slow
@pytest.mark.parametrize(("executor", "pool"), FIGURE_CASES)
def test_figures_of_a_big_and_a_small_run_on_the_run_worker(
        executor, pool, mariadb_url, simulator, broker_url, redis_prefix, dagster_mysql_env, s3, aws_test_credentials,
        tmp_path):
    """Prints the wall time and CPU (summed over the worker processes the run used) of a first sync
    of FIGURES_LEADS leads (50 in the suite, 200 and 1,000 for the README's figures) and of a run
    with little new work, with `executor` inside the run worker."""
    scenario = scenarios.mixed(task_id=7430, n_leads=int(os.environ.get("FIGURES_LEADS", "50")), seed=96)
    step_workers = ("sync-query", "download-ai") if executor == "celery" else ()
    with production(tmp_path, mariadb_url, simulator, broker_url, redis_prefix, dagster_mysql_env, s3,
                    runs_concurrency=2, runs_pool=pool, CALL_PIPELINE_EXECUTOR=executor,
                    CALL_PIPELINE_SENSOR_TICK_SECONDS="100000",
                    knobs={"max_concurrency": 16, "max_qps": 50}) as (instance, processes, _):
        scenario.install(mariadb_url, simulator)
        simulator.state.set_latency(outboundbot_ms=30, dashscope_ms=300)
        instance.add_dynamic_partitions("call_tasks", [str(scenario.task_id)])
        figures = {}
        for kind in ("big", "small", "small-again", "nothing"):
            if kind.startswith("small"):
                import sqlalchemy as sa

                from call_pipeline.crm.database import get_crm_engine

                with get_crm_engine(mariadb_url).begin() as conn:
                    conn.execute(sa.text("UPDATE call_tasks SET task_type = 2 WHERE id = :id"),
                                 {"id": scenario.task_id})
            before = workers_cpu(processes, (RUNS_WORKER, *step_workers))
            run_id = submit_run(processes, scenario.task_id)
            run = wait_for_finished(instance, processes, run_id)
            time.sleep(1.0)  # the pool process's last writes after the run's end
            cpu = workers_cpu(processes, (RUNS_WORKER, *step_workers)) - before
            assert run.status == dg.DagsterRunStatus.SUCCESS, processes.output(RUNS_WORKER)[-3000:]
            assert_ran_in_the_run_worker(instance, processes, run_id)
            figures[kind] = (round(run_wall_seconds(instance, run_id), 2), round(cpu, 2))
        print(f"\nFIGURES executor={executor} pool={pool} (wall s, worker CPU s): {figures}")


@pytest.mark.slow
@pytest.mark.parametrize(("killed", "pool"), [("worker", "threads"), ("worker", "prefork"),
                                               ("pool process", "prefork")])
def test_a_run_whose_worker_is_killed_is_failed_and_retried(
        killed, pool, mariadb_url, simulator, clean_run, broker_url, redis_prefix, dagster_mysql_env, s3,
        aws_test_credentials, tmp_path):
    """SIGKILL in the middle of step 5: the whole run worker (a second one is started on `runs`),
    or only the prefork pool process that executes the run (its worker starts another). The run's task,
    acknowledged late, is delivered again; that delivery fails the run (it does not stay STARTED)
    and the daemon's run retry finishes the task; the task's Celery state ends SUCCESS; the CRM
    is a clean run's, no follow-up written twice."""
    from celery import Celery

    from call_pipeline_tests.reliability.test_database_faults import follow_up_count

    scenario = scenarios.mixed(task_id=7440, n_leads=60, seed=97)
    clean = clean_run(scenario)
    scenario.install(mariadb_url, simulator)
    expected = sum(1 for lead in clean["leads"].values() if lead["follow_up"])
    simulator.state.set_latency(dashscope_ms=300)
    with production(tmp_path, mariadb_url, simulator, broker_url, redis_prefix, dagster_mysql_env, s3,
                    runs_pool=pool, ui=False, CALL_PIPELINE_EXECUTOR="in_process", knobs={"max_concurrency": 2},
                    **SHORT_LEASE) as (
            instance, processes, env):
        _wait_for(lambda: follow_up_count(mariadb_url) >= 3, 180, "the first follow-ups")
        killed_run = next(r for r in sync_runs(instance) if r.status == dg.DagsterRunStatus.STARTED)
        worker, _ = processes.running[RUNS_WORKER]
        if killed == "worker":
            os.killpg(worker.pid, signal.SIGKILL)
            start_worker(processes, env, tmp_path, RUNS_WORKER, suffix="-2", pool=pool)
        else:
            os.kill(run_pid(instance, killed_run.run_id), signal.SIGKILL)
        written = follow_up_count(mariadb_url)
        assert written < expected
        simulator.state.set_latency(dashscope_ms=0)
        skip = (RUNS_WORKER,) if killed == "worker" else ()
        failed = wait_for_run(instance, processes, lambda runs: next(
            (r for r in runs if r.run_id == killed_run.run_id and r.is_finished), None), "the killed run", skip=skip)
        assert failed.status == dg.DagsterRunStatus.FAILURE
        assert any("Celery worker stopped while it ran" in (e.message or "") for e in instance.all_logs(
            failed.run_id, of_type=dg.DagsterEventType.RUN_FAILURE))
        retry = wait_for_run(instance, processes, lambda runs: next(
            (r for r in runs if r.tags.get("dagster/parent_run_id") == failed.run_id and r.is_finished), None),
            "the retry", skip=skip)
        assert retry.status == dg.DagsterRunStatus.SUCCESS
        if killed == "worker":
            new_worker, _ = processes.running[f"{RUNS_WORKER}-2"]
            assert run_pid(instance, retry.run_id) in {new_worker.pid} | pool_processes(new_worker.pid)
        else:
            assert_ran_in_the_run_worker(instance, processes, retry.run_id)
        app = Celery(broker=env["CALL_PIPELINE_CELERY_BROKER"], backend=env["CALL_PIPELINE_CELERY_BACKEND"])
        try:
            _wait_for(lambda: app.AsyncResult(failed.tags["dagster-celery/task_id"]).state == "SUCCESS", 60,
                      "the killed run's task to finish")
        finally:
            app.close()
    assert_matches_clean_run(normalized(mariadb_url, scenario.task_id), clean)
    assert follow_up_count(mariadb_url) == expected


def _deploy_config() -> dict:
    import yaml

    from call_pipeline.crm.database import PROJECT_ROOT

    return yaml.safe_load((PROJECT_ROOT / "deploy" / "dagster.yaml").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_runs_queued_at_once_all_run_on_the_run_worker(
        mariadb_url, simulator, broker_url, redis_prefix, dagster_mysql_env, s3, aws_test_credentials, tmp_path):
    """FIGURES_RUNS tasks of 3 leads (30 in the suite; 100 for the README's figures) appear at once;
    the sensor queues a run for each in one tick; each runs on the run worker (FIGURES_RUN_POOL,
    FIGURES_RUN_SLOTS: by default as `serve` starts it, threads as many as deploy/dagster.yaml's
    max_concurrent_runs).
    Prints, counted from the first run's creation: every run launched (handed to the broker),
    started (RUN_START) and finished, and the CPU of the run worker and of the daemon (§11 asks for
    100 all started within 30 s: see README, "Runs on Celery workers", for what bounds it here)."""
    count = int(os.environ.get("FIGURES_RUNS", "30"))
    tasks = [scenarios.mixed(task_id=7500 + i, n_leads=3, leads_id_offset=10 * i, seed=i) for i in range(count)]
    # as `serve` starts the run workers: one per CPU, each with threads, as many in all as the runs
    # handed over at once
    run_workers = int(os.environ.get("FIGURES_RUN_WORKERS", str(os.cpu_count() or 1)))
    handed_over = _deploy_config()["concurrency"]["runs"]["max_concurrent_runs"]
    concurrency = int(os.environ.get("FIGURES_RUN_SLOTS", str(-(-handed_over // run_workers))))
    pool = os.environ.get("FIGURES_RUN_POOL", "threads")
    # FIGURES_MAX_RUNS: the daemon's max_concurrent_runs; FIGURES_POOL_LIMIT: the pools' default limit
    overrides = {}
    if os.environ.get("FIGURES_MAX_RUNS"):
        overrides["concurrency"] = {"runs": {**_deploy_config()["concurrency"]["runs"],
                                             "max_concurrent_runs": int(os.environ["FIGURES_MAX_RUNS"])}}
    if os.environ.get("FIGURES_POOL_LIMIT"):
        overrides.setdefault("concurrency", dict(_deploy_config()["concurrency"]))["pools"] = {
            "default_limit": int(os.environ["FIGURES_POOL_LIMIT"])}
    # in the CRM and the cloud before anything starts: the sensor's first tick queues every run
    for scenario in tasks:
        scenario.install(mariadb_url, simulator)
    with production(tmp_path, mariadb_url, simulator, broker_url, redis_prefix, dagster_mysql_env, s3,
                    runs_concurrency=concurrency, runs_pool=pool, runs_workers=run_workers,
                    instance_overrides=overrides, ui=False,
                    CALL_PIPELINE_EXECUTOR="in_process") as (instance, processes, _):
        workers = tuple(name for name in processes.running if name.startswith(RUNS_WORKER))
        cpu_before = {"runs": workers_cpu(processes, workers), "daemon": workers_cpu(processes, ("daemon",))}
        wait_for_run(instance, processes, lambda runs: runs if len(runs) >= len(tasks) and all(
            r.is_finished for r in runs) else None, f"{count} finished runs", timeout_s=600)
        runs = sync_runs(instance)
        records = [instance.get_run_record_by_id(r.run_id) for r in runs]
        created = min(r.create_timestamp.timestamp() for r in records)
        queued_over = max(r.create_timestamp.timestamp() for r in records) - created
        launched = max(e.timestamp for r in runs for e in instance.all_logs(
            r.run_id, of_type=dg.DagsterEventType.RUN_STARTING))
        started = max(r.start_time for r in records)
        finished = max(r.end_time for r in records)
        waits = sorted(r.start_time - r.create_timestamp.timestamp() for r in records)
        cpu = {name: round(workers_cpu(processes, workers if name == "runs" else (name,)) - before, 1)
               for name, before in cpu_before.items()}
        print(f"\nFIGURES {count} runs, {run_workers} worker(s) x {concurrency} slots ({pool}): "
              f"all launched {launched - created:.1f} s, "
              f"all started {started - created:.1f} s, all finished {finished - created:.1f} s "
              f"after the first was queued (all queued within {queued_over:.1f} s); "
              f"queued-to-started median {waits[len(waits) // 2]:.1f} s, max {waits[-1]:.1f} s; CPU s {cpu}; "
              f"load average {os.getloadavg()}")
        failed = [r.run_id for r in runs if r.status != dg.DagsterRunStatus.SUCCESS]
        assert not failed, "\n".join(m for m in event_messages(instance, failed) if "rror" in m)[-6000:]
        assert len({r.tags["dagster/partition"] for r in runs}) == len(tasks)
        for run in runs[:5]:
            assert_ran_in_the_run_worker(instance, processes, run.run_id)


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_run_terminated_from_the_ui_is_canceled_and_its_pool_process_lives_on(
        pool, mariadb_url, simulator, broker_url, redis_prefix, dagster_mysql_env, s3, aws_test_credentials,
        tmp_path):
    """The UI's "Terminate" (the webserver's terminateRun) in the middle of step 5: the production
    launcher marks the run CANCELING, the run task stops it (an interrupt on a prefork pool
    process's main thread; on a threads pool, which no signal reaches, the step stops itself
    between the batches it writes), the retry policy of the interrupted step does not carry it
    on, and the run ends CANCELED soon (not after run monitoring's cancel timeout), without every
    follow-up written; the process that ran it runs the next run, which finishes the task."""
    from call_pipeline_tests.reliability.test_database_faults import follow_up_count

    scenario = scenarios.mixed(task_id=7450, n_leads=60, seed=98)
    scenario.install(mariadb_url, simulator)
    simulator.state.set_latency(dashscope_ms=1000)
    with production(tmp_path, mariadb_url, simulator, broker_url, redis_prefix, dagster_mysql_env, s3,
                    runs_concurrency=1, runs_pool=pool, CALL_PIPELINE_EXECUTOR="in_process",
                    knobs={"max_concurrency": 1}) as (instance, processes, _):
        _wait_for(lambda: follow_up_count(mariadb_url) >= 1, 180, "the first follow-up")
        run = next(r for r in sync_runs(instance) if r.status == dg.DagsterRunStatus.STARTED)
        pid = run_pid(instance, run.run_id)
        terminated = graphql(processes, TERMINATE, runId=run.run_id)["terminateRun"]
        assert terminated["__typename"] == "TerminateRunSuccess", terminated
        asked = time.monotonic()
        canceled = wait_for_run(instance, processes, lambda runs: next(
            (r for r in runs if r.run_id == run.run_id and r.is_finished), None), "the terminated run", 120)
        assert canceled.status == dg.DagsterRunStatus.CANCELED, canceled.status
        assert time.monotonic() - asked < 60  # the run's own interrupt, not monitoring's 180 s timeout
        at_cancel = follow_up_count(mariadb_url)
        simulator.state.set_latency(dashscope_ms=0)
        rerun = wait_for_finished(instance, processes, submit_run(processes, scenario.task_id))
        assert rerun.status == dg.DagsterRunStatus.SUCCESS
        assert follow_up_count(mariadb_url) > at_cancel  # the canceled run stopped before its end
        assert run_pid(instance, rerun.run_id) == pid  # the same pool process (concurrency 1) lived on


@pytest.mark.slow
def test_the_multiprocess_executor_cannot_start_steps_in_a_prefork_pool_process(
        mariadb_url, simulator, broker_url, redis_prefix, dagster_mysql_env, s3, aws_test_credentials, tmp_path):
    """Why the run workers' executor is not `multiprocess`: a prefork pool process is daemonic, and
    a daemonic process may not start children, so the run fails at its first step."""
    scenario = scenarios.mixed(task_id=7460, n_leads=5, seed=99)
    with production(tmp_path, mariadb_url, simulator, broker_url, redis_prefix, dagster_mysql_env, s3,
                    runs_pool="prefork", CALL_PIPELINE_EXECUTOR="multiprocess",
                    CALL_PIPELINE_SENSOR_TICK_SECONDS="100000") as (
            instance, processes, _):
        scenario.install(mariadb_url, simulator)
        instance.add_dynamic_partitions("call_tasks", [str(scenario.task_id)])
        run = wait_for_finished(instance, processes, submit_run(processes, scenario.task_id))
        assert run.status == dg.DagsterRunStatus.FAILURE
        assert_ran_in_the_run_worker(instance, processes, run.run_id)
    assert "daemonic processes are not allowed to have children" in processes.output(RUNS_WORKER)
