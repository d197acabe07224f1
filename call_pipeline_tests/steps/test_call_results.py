"""Step 3 on MariaDB, through the real OutboundBot SDK against the simulator: the same problem of
many jobs is one log line naming them, not a line per job."""

from __future__ import annotations

import logging
from datetime import datetime
from zoneinfo import ZoneInfo

from call_pipeline.crm import repository as repo
from call_pipeline.crm.database import get_crm_engine
from call_pipeline.steps.batch import PageRequest
from call_pipeline.steps.call_results import NAMED_PER_LINE, named_jobs, update_call_results
from call_pipeline.steps.env import StepEnv
from call_pipeline.steps.matching import match_jobs_of_pages
from call_pipeline_tests.clients.test_outboundbot_client import make_client
from call_pipeline_tests.pipeline_harness import create_task, new_reference
from call_pipeline_tools.simulator.scenarios import build_job_group

NOW = datetime(2026, 11, 28, 10, 0)


def test_named_jobs_names_the_first_and_counts_the_rest():
    assert named_jobs(["a", "b"]) == "job a, job b"
    jobs = [f"j{i}" for i in range(NAMED_PER_LINE + 5)]
    line = named_jobs(jobs)
    assert line.startswith("job j0, job j1") and f"job j{NAMED_PER_LINE - 1}" in line
    assert f"job j{NAMED_PER_LINE}" not in line and line.endswith(" and 5 more job(s)")


def test_one_line_per_problem_naming_its_jobs(mariadb_url, simulator, tmp_path, caplog):
    n = 40
    task_id = create_task(mariadb_url, job_group_id="jg-step3", leads=[])
    leads = [{"leads_id": i, "leads_phone": f"1370000{i:04d}", "reference_id": new_reference(task_id, i)}
             for i in range(1, n + 1)]
    from call_pipeline_tests.test_sync_job import create_task_leads

    create_task_leads(mariadb_url, task_id, leads)
    # 25 ended jobs that were never dialled (no call attempts), one with an unknown status
    specials = {i: "no_tasks" for i in range(1, 26)} | {30: "unknown_status"}
    simulator.state.add_job_group(build_job_group("jg-step3", leads, task_id=task_id, seed=5,
                                                  status_mix={"Succeeded": 1.0}, special_cases=specials))
    engine = get_crm_engine(mariadb_url)
    client = make_client(simulator, tmp_path)
    with engine.connect() as conn:
        task = repo.fetch_task(conn, task_id)
    env = StepEnv(engine=engine, zone=ZoneInfo("Asia/Shanghai"), clock=lambda: NOW, outboundbot=client)
    batch = match_jobs_of_pages(env, PageRequest(task, 1, 100, 1))
    assert len(batch.job_ids) == n

    with caplog.at_level(logging.WARNING):
        report = update_call_results(env, batch)
    assert report.counts.results_stored == n and not report.failures
    lines = [r.getMessage() for r in caplog.records if "no call attempts" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"task {task_id}: job has no call attempts: job ")
    assert lines[0].endswith(f" and {25 - NAMED_PER_LINE} more job(s)")
    assert lines[0].count("job ") == 1 + NAMED_PER_LINE  # "job has …" and each job named
    unknown = [r.getMessage() for r in caplog.records if "unknown job status" in r.getMessage()]
    assert len(unknown) == 1 and unknown[0].count(", job ") == 0
