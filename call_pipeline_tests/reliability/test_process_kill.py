"""The run's process killed with SIGKILL (the run worker dies, say OOM), marked failed (what run
monitoring does), and re-executed from failure, as an operator does from the UI.

Dagster's re-execution from failure runs the failed and interrupted steps and what follows them,
but not the mapped steps that never started in the killed run (their page's upstream step
succeeded): those pages' matching, results, recordings or follow-ups would simply be missing
from the re-execution, which would then mark their leads unmatched and could conclude the task.
The pipeline's wait op therefore redoes, in a re-execution, whatever the task still needs."""

from __future__ import annotations

import os
import signal
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
    subprocess_env,
)
from call_pipeline_tests.reliability.invariant import Monitor, assert_matches_clean_run, normalized


def count(crm_url: str, sql: str) -> int:
    with get_crm_engine(crm_url).connect() as conn:
        return int(conn.execute(sa.text(sql)).scalar())


FOLLOW_UPS = "SELECT COUNT(*) FROM dcc_leads_follow"
MATCHED = "SELECT COUNT(*) FROM leads_task_list WHERE call_job_id IS NOT NULL"


@pytest.mark.slow
@pytest.mark.parametrize("when", ["during_step_5", "during_the_first_page"])
def test_sigkill_then_reexecute_from_failure(mariadb_url, simulator, instance, env, clean_run, tmp_path, when):
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
        proc = start_run_process(scenario.task_id, proc_env, tmp_path / "killed_run.log")
        deadline = time.monotonic() + 90
        # during step 5: once a few follow-ups are written; during the first batch of pages: once
        # it is matched (its follow-ups may not be written yet: the writer gathers them)
        progress, needed = (FOLLOW_UPS, 3) if when == "during_step_5" else (MATCHED, 1)
        while count(mariadb_url, progress) < needed:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
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
        settled = settle(instance, mariadb_url, scenario.task_id, first_run_id=runs[0].run_id, first_kind="killed")

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
