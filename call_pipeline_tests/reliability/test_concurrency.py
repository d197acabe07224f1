"""Runs that overlap: two runs of the same partition at the same time (forced around the
sensor's guard and the per-partition run limit, each in its own process), and jobs added to the
job group while a run is paging through it."""

from __future__ import annotations

import json

import pytest

from call_pipeline_tests.reliability import scenarios
from call_pipeline_tests.reliability.harness import (
    event_messages,
    finish_run_process,
    pipeline_env_vars,
    settle,
    start_run_process,
    subprocess_env,
)
from call_pipeline_tests.reliability.invariant import Monitor, assert_matches_clean_run, normalized
from call_pipeline_tests.reliability.test_database_faults import follow_up_count, when


@pytest.mark.slow
def test_two_runs_of_one_partition_at_the_same_time(mariadb_url, simulator, instance, env, clean_run, tmp_path):
    scenario = scenarios.mixed()
    clean = clean_run(scenario)
    scenario.install(mariadb_url, simulator)
    expected = sum(1 for lead in clean["leads"].values() if lead["follow_up"])
    llm_leads = sum(1 for lead in clean["leads"].values() if lead["follow_up"] in ("llm", "ai_fallback"))
    # Step 5 of each run lasts seconds (LLM calls of 0.4 s, 4 at once across both runs), much
    # longer than the spread of the two runs' start-up, so the two step-5 ops overlap.
    simulator.state.set_latency(outboundbot_ms=10, dashscope_ms=400)
    instance.add_dynamic_partitions("call_tasks", [str(scenario.task_id)])
    proc_env = subprocess_env(pipeline_env_vars(mariadb_url, simulator, max_concurrency=4),
                              dagster_home=instance.root_directory)

    with Monitor(mariadb_url, [scenario.task_id]):
        procs = [start_run_process(scenario.task_id, proc_env, tmp_path / f"run_{i}.log") for i in range(2)]
        reports = [finish_run_process(proc, timeout=180) for proc in procs]
        assert all(r["success"] for r in reports), [r["output"][-3000:] for r in reports]
        settled = settle(instance, mariadb_url, scenario.task_id)

    assert_matches_clean_run(normalized(mariadb_url, scenario.task_id), clean)
    assert follow_up_count(mariadb_url) == expected  # one follow-up per lead, whoever won
    # the two runs did overlap: both asked the LLM about some of the same leads, and the loser of
    # each race said so instead of writing a second follow-up
    messages = "\n".join(event_messages(instance, [r["run_id"] for r in reports]))
    raced = messages.count("follow-up already written by another run")
    assert simulator.state.stats()["dashscope_requests"] > llm_leads
    assert raced >= 1, f"the runs' step 5 did not overlap: {json.dumps(simulator.state.stats()['requests'])}"
    assert all(a.success for a in settled.attempts)


def test_jobs_added_while_a_run_pages_through_the_group(mariadb_url, simulator, instance, env, clean_run):
    """The group grows while the first run pages through it (it counted the pages at the start):
    the new jobs' leads are marked unmatched for now, and the next run matches them and clears
    the mark. One job is still calling, so the task is not concluded meanwhile (contract: "Task state")."""
    scenario = scenarios.mixed(task_id=7002, n_leads=60)
    # the job of lead 1 is still running in both runs
    running = scenario.job_of(scenario.leads[0]["leads_id"])
    running["Status"] = "Executing"
    running["Tasks"] = running["Tasks"][:1]
    running["Tasks"][0].update(Status="Executing", Conversation=[])
    scenario.initial_jobs = 38  # pages 1-2 exist at the start; 21 more jobs arrive mid-run
    clean = clean_run(scenario)
    assert clean["task_type"] == 2
    scenario.install(mariadb_url, simulator)
    simulator.state.set_latency(outboundbot_ms=30)
    late = scenario.late_jobs()
    late_leads = [job["_sim"]["leads_id"] for job in late if job["_sim"]["leads_id"]]

    # the first run counts the pages (38 jobs: 2 pages), then the group grows while it matches page 2
    adder = when(lambda: simulator.state.stats()["requests"].get("ListJobsByGroup", 0) >= 2,
                 lambda: simulator.state.add_jobs(scenario.job_group_id, late))
    after_first_run = []

    def remember_first(attempt) -> None:
        if not after_first_run:
            after_first_run.append(normalized(mariadb_url, scenario.task_id))

    with Monitor(mariadb_url, [scenario.task_id]):
        settled = settle(instance, mariadb_url, scenario.task_id, after_each=remember_first)
    adder.stop()

    # the first run did not see the jobs beyond its page count: their leads were marked for now
    first = after_first_run[0]["leads"]
    not_seen = [lid for lid in late_leads if first[lid]["call_job_id"] is None]
    assert len(not_seen) >= 15 and all(first[lid]["call_status"] == "Failed" for lid in not_seen)
    first_messages = event_messages(instance, settled.run_ids[:1])
    assert any("matched no job and are marked Failed for now" in m for m in first_messages)
    # a later run matched them, cleared the mark and did the rest
    assert_matches_clean_run(normalized(mariadb_url, scenario.task_id), clean)
    assert len(settled.attempts) >= 3
