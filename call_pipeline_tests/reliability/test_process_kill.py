"""The run's process killed with SIGKILL (the run worker dies, say OOM), marked failed (what run
monitoring does), and re-executed from failure, as an operator does from the UI; and the step
processes of a run killed in the middle of their batches while the run itself goes on.

Dagster's re-execution from failure runs the failed and interrupted steps and what follows them,
but not the mapped steps that never started in the killed run (their page's upstream step
succeeded): those pages' matching, results, recordings or follow-ups would simply be missing
from the re-execution, which would then mark their leads unmatched and could conclude the task.
The op after `.collect()` therefore does, in a re-execution, the batches of the run's plan that
no run of its lineage completed (call_pipeline/steps/catch_up.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import dagster as dg
import pytest
import sqlalchemy as sa

from call_pipeline.crm.database import get_crm_engine
from call_pipeline_tests.reliability import scenarios
from call_pipeline_tests.reliability.harness import (
    finish_run_process,
    pipeline_env_vars,
    settle,
    start_run_process,
    step_processes,
    subprocess_env,
)
from call_pipeline_tests.reliability.invariant import Monitor, assert_matches_clean_run, normalized


def count(crm_url: str, sql: str) -> int:
    with get_crm_engine(crm_url).connect() as conn:
        return int(conn.execute(sa.text(sql)).scalar())


FOLLOW_UPS = "SELECT COUNT(*) FROM dcc_leads_follow"
READ_FROZEN_S = 5.0
STEP_ENDS = {dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE,
             dg.DagsterEventType.STEP_UP_FOR_RETRY}


def kill_unfinished_steps(instance: dg.DagsterInstance, processes: list) -> set[int]:
    """SIGKILLs the step processes whose step has not reported its end; returns their pids.
    A step process lives on for a moment after its step's success, and the multiprocess executor
    takes a kill then for an engine error ("Attempted to mark step ... as complete that was not
    known to be in flight"): the whole run fails, not the step. So the processes are frozen first
    (SIGSTOP): a step writes its end to the event log before it tells the run process, so what the
    log holds once they are frozen decides, and nothing reports an end between the read and the kill.
    A process frozen while it writes its run's SQLite event log (or checkpoints it) holds the log's
    lock, and the read would wait for it (Dagster retries "database is locked" for minutes): when
    the read has not returned within READ_FROZEN_S, the processes go on, the read's answer is
    dropped, and nothing is killed this time (an empty set: the caller tries again)."""
    import psutil

    frozen = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.suspend()
            frozen.append(process)
    answer: list = []

    def read() -> None:
        try:
            answer.append({entry.dagster_event.pid for run in instance.get_runs()
                           for entry in instance.all_logs(run.run_id, of_type=STEP_ENDS)})
        except Exception as exc:  # noqa: BLE001 - raised in the caller's thread below
            answer.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(READ_FROZEN_S)
    if reader.is_alive() or isinstance(answer[0], Exception):
        for process in frozen:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.resume()
        reader.join()
        if isinstance(answer[0], Exception):
            raise answer[0]
        return set()
    ended = answer[0]
    killed = set()
    for process in frozen:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.pid in ended:
                process.resume()
            else:
                process.send_signal(signal.SIGKILL)
                killed.add(process.pid)
    return killed
MATCHED = "SELECT COUNT(*) FROM leads_task_list WHERE call_job_id IS NOT NULL"


@pytest.mark.slow
@pytest.mark.parametrize(("when", "executor"), [
    ("during_step_5", None),
    # the in-process executor runs one step at a time: killed while the first batch is matched,
    # the later batches' steps never started, which a re-execution from failure leaves out
    ("during_the_first_page", "in_process"),
])
def test_sigkill_then_reexecute_from_failure(mariadb_url, simulator, instance, env, clean_run, tmp_path, when,
                                             executor):
    scenario = scenarios.mixed()
    clean = clean_run(scenario)
    scenario.install(mariadb_url, simulator)
    expected = sum(1 for lead in clean["leads"].values() if lead["follow_up"])
    env(max_concurrency=2)
    if when == "during_step_5":
        simulator.state.set_latency(dashscope_ms=250)  # step 5 takes several seconds
    else:
        simulator.state.set_latency(outboundbot_ms=300, dashscope_ms=50)  # the pages come slowly
    instance.add_dynamic_partitions("call_tasks", [str(scenario.task_id)])
    proc_env = subprocess_env(pipeline_env_vars(mariadb_url, simulator, max_concurrency=2),
                              dagster_home=instance.root_directory)

    with Monitor(mariadb_url, [scenario.task_id]):
        proc = start_run_process(scenario.task_id, proc_env, tmp_path / "killed_run.log", executor=executor)
        deadline = time.monotonic() + 90
        # during step 5: once a few follow-ups are written; during the first batch of pages: once
        # it is matched (its follow-ups may not be written yet: the writer gathers them)
        progress, needed = (FOLLOW_UPS, 3) if when == "during_step_5" else (MATCHED, 1)
        while count(mariadb_url, progress) < needed:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.02)
        # the run process and its step processes die together (the run worker's machine or
        # container is gone); run monitoring or the operator marks the run failed
        os.killpg(proc.pid, signal.SIGKILL)
        report = finish_run_process(proc, timeout=30)
        assert report["returncode"] == -signal.SIGKILL
        assert count(mariadb_url, FOLLOW_UPS) < expected
        if when == "during_step_5":
            assert count(mariadb_url, FOLLOW_UPS) > 0
        else:
            assert count(mariadb_url, MATCHED) < len(scenario.jobs_by_lead)  # later pages never started

        # run monitoring (or the operator) marks the dead run failed; the operator re-executes it
        runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": str(scenario.task_id)}))
        assert len(runs) == 1 and runs[0].status == dg.DagsterRunStatus.STARTED
        instance.report_run_failed(runs[0], message="the run's process was killed (SIGKILL)")
        simulator.state.set_latency(outboundbot_ms=0, dashscope_ms=0)
        settled = settle(instance, mariadb_url, scenario.task_id, first_run_id=runs[0].run_id, first_kind="killed",
                         executor=executor)

    reexecution = settled.attempts[1]
    assert reexecution.kind == "from_failure" and reexecution.success
    # the re-execution alone finished the task: the relaunch after it changed nothing
    assert len(settled.attempts) == 3
    assert_matches_clean_run(normalized(mariadb_url, scenario.task_id), clean)
    assert count(mariadb_url, FOLLOW_UPS) == expected  # nothing written twice, nothing half-written
    if when == "during_the_first_page":
        # killed while the first batch was matched: the later batches' matching never started, and
        # the re-execution got their downstream steps with inputs no run produced (io_managers.py)
        messages = [record.message or "" for record in instance.all_logs(reexecution.run_id)]
        assert any("which no run of this lineage executed" in m for m in messages), messages[-20:]
        assert any("not completed in this run's lineage" in m for m in messages), messages[-20:]


@pytest.mark.slow
@pytest.mark.parametrize("rounds", [1, 2])
def test_step_processes_killed_mid_batch(mariadb_url, simulator, instance, env, clean_run, tmp_path, rounds):
    """The default executor runs each step in a process of its own; the step processes are
    SIGKILLed mid-batch (some follow-ups written, others not). The run process sees them die:
    once, the op's retry policy runs the step again and the run finishes the batch itself; twice
    (every retry the tests allow), the run fails and a re-execution from failure finishes it.
    Either way the CRM ends as a clean run's, nothing written twice."""
    scenario = scenarios.mixed()
    clean = clean_run(scenario)
    scenario.install(mariadb_url, simulator)
    expected = sum(1 for lead in clean["leads"].values() if lead["follow_up"])
    simulator.state.set_latency(outboundbot_ms=30, dashscope_ms=250)  # step 5 takes several seconds
    instance.add_dynamic_partitions("call_tasks", [str(scenario.task_id)])
    proc_env = subprocess_env(pipeline_env_vars(mariadb_url, simulator, max_concurrency=2),
                              dagster_home=instance.root_directory)

    with Monitor(mariadb_url, [scenario.task_id]):
        proc = start_run_process(scenario.task_id, proc_env, tmp_path / "run.log")
        killed: set[int] = set()
        for _ in range(rounds):
            # wait for step processes not killed yet (the retries) with follow-ups written meanwhile
            written_before = count(mariadb_url, FOLLOW_UPS)
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, "the run ended before its steps could be killed"
                assert time.monotonic() < deadline, "the run made no progress"
                fresh = [p for p in step_processes(proc.pid) if p.pid not in killed]
                if fresh and count(mariadb_url, FOLLOW_UPS) >= written_before + 2:
                    killed_now = kill_unfinished_steps(instance, fresh)
                    if killed_now:
                        killed |= killed_now
                        break
                time.sleep(0.02)
        report = finish_run_process(proc, timeout=120)
        run = instance.get_run_by_id(report["run_id"])
        messages = [record.message or "" for record in instance.all_logs(run.run_id)]
        assert any("was terminated by signal 9" in m for m in messages), messages[-20:]
        if rounds == 1:
            assert report["success"], report["output"][-3000:]
            assert any("requested a retry" in m for m in messages)
        else:
            assert not report["success"] and run.status == dg.DagsterRunStatus.FAILURE
            assert 0 < count(mariadb_url, FOLLOW_UPS) < expected
        simulator.state.set_latency(outboundbot_ms=0, dashscope_ms=0)
        settled = settle(instance, mariadb_url, scenario.task_id, first_run_id=run.run_id, first_kind="steps_killed")

    if rounds == 2:
        reexecution = settled.attempts[1]
        assert reexecution.kind == "from_failure" and reexecution.success
    assert_matches_clean_run(normalized(mariadb_url, scenario.task_id), clean)
    assert count(mariadb_url, FOLLOW_UPS) == expected  # nothing written twice, nothing half-written
