"""A run costs what its new work costs, and pages are what the cloud sent (contract: "Which jobs
a run works on", "Step 2"). `sync_call_task` on a real CRM against the simulator through the real
SDK, counted by the simulator's per-action counters."""

from __future__ import annotations

import pytest

from call_pipeline.domain.call_results import TERMINAL_JOB_STATUSES
from call_pipeline_tests.pipeline_harness import (
    create_task,
    new_reference,
    project_instance_for_test,
    run_sync,
    snapshot,
)
from call_pipeline_tools.simulator.scenarios import build_job_group

PAGING = {"page_size": 50, "pages_per_batch": 2}


@pytest.fixture
def instance():
    with project_instance_for_test() as instance:
        yield instance


def leads_of(task_id: int, ids: range) -> list[dict]:
    return [{"leads_id": i, "leads_phone": f"1361000{i:04d}", "reference_id": new_reference(task_id, i)} for i in ids]


def new_task(crm_url: str, group_id: str, ids: range) -> tuple[int, list[dict]]:
    task_id = create_task(crm_url, job_group_id=group_id, leads=[])
    leads = leads_of(task_id, ids)
    _insert_leads(crm_url, task_id, leads)
    return task_id, leads


def _insert_leads(crm_url: str, task_id: int, leads: list[dict]) -> None:
    from call_pipeline_tests.test_sync_job import create_task_leads

    create_task_leads(crm_url, task_id, leads)


def requests(simulator) -> dict:
    return simulator.state.stats()["requests"]


def not_terminal(crm) -> list[int]:
    return [lid for lid, lead in crm.leads.items()
            if lead["call_job_id"] and lead["call_status"] not in TERMINAL_JOB_STATUSES]


def test_a_matched_task_whose_group_did_not_grow_lists_no_page(crm_url, simulator, instance):
    task_id, leads = new_task(crm_url, "jg-inc", range(1, 301))
    simulator.state.add_job_group(build_job_group("jg-inc", leads, task_id=task_id, seed=3, status_mix={
        "Succeeded": 0.5, "Failed": 0.2, "Executing": 0.3}))
    assert run_sync(crm_url, simulator, task_id, instance, paging=PAGING).success
    first = snapshot(crm_url, task_id)
    assert all(lead["call_job_id"] for lead in first.leads.values())
    calling = not_terminal(first)
    assert len(calling) == 90 and first.task_type == 2

    # the calls end in the cloud; the group does not grow
    simulator.state.advance("jg-inc", steps=1)
    simulator.state.reset_stats()
    result = run_sync(crm_url, simulator, task_id, instance, paging=PAGING)
    assert result.success
    stats = simulator.state.stats()
    assert "ListJobsByGroup" not in stats["requests"]
    # step 3 asked about the jobs not terminal yet, and only them: 90 jobs in two batches of jobs
    assert stats["list_jobs_job_ids"] == 90 and stats["requests"]["ListJobs"] == 2
    assert {e.step_key for e in result.all_events if e.is_step_success and e.step_key.startswith("match_job_page")} \
        == {"match_job_page[jobs_1]", "match_job_page[jobs_2]"}
    # ... and completed them: results, recordings, follow-ups, the task
    crm = snapshot(crm_url, task_id)
    assert not not_terminal(crm)
    assert all(crm.leads[lid]["leads_follow_id"] for lid in calling)
    succeeded = [lid for lid in calling if crm.leads[lid]["call_status"] == "Succeeded"]
    assert succeeded and stats["requests"]["DownloadRecording"] == len(succeeded)
    assert all(crm.leads[lid]["recording_url"] for lid in succeeded)
    assert len(crm.follow_ups) == 300 and crm.task_type == 4
    assert {lid: crm.leads[lid] for lid in crm.leads if lid not in calling} == \
        {lid: first.leads[lid] for lid in first.leads if lid not in calling}


def test_a_group_that_grows_is_paged_and_a_failed_lead_matched_when_its_job_comes(mariadb_url, simulator,
                                                                                  instance):
    late_lead = 7
    task_id, leads = new_task(mariadb_url, "jg-grow", range(1, 201))
    simulator.state.add_job_group(build_job_group("jg-grow", leads, task_id=task_id, seed=4, skip_leads=[late_lead],
                                                  status_mix={"Succeeded": 0.7, "Executing": 0.3}))
    assert run_sync(mariadb_url, simulator, task_id, instance, paging=PAGING).success
    crm = snapshot(mariadb_url, task_id)
    assert crm.leads[late_lead]["call_job_id"] is None and crm.leads[late_lead]["call_status"] == "Failed"
    assert sum(bool(lead["call_job_id"]) for lead in crm.leads.values()) == 199

    # every job of the group is held: the lead without a job does not make the run page
    simulator.state.reset_stats()
    assert run_sync(mariadb_url, simulator, task_id, instance, paging=PAGING).success
    assert "ListJobsByGroup" not in requests(simulator)
    assert snapshot(mariadb_url, task_id).leads[late_lead]["call_status"] == "Failed"

    # the group grows: its late job, and 60 new leads with their jobs
    added = leads_of(task_id, range(201, 261))
    _insert_leads(mariadb_url, task_id, added)
    late = build_job_group("jg-late", [leads[late_lead - 1], *added], task_id=task_id, seed=8,
                           status_mix={"Succeeded": 1.0})
    simulator.state.add_jobs("jg-grow", late["jobs"])
    simulator.state.reset_stats()
    assert run_sync(mariadb_url, simulator, task_id, instance, paging=PAGING).success
    assert requests(simulator)["ListJobsByGroup"] == 1 + 6  # TotalCount, then 261 jobs in pages of 50
    crm = snapshot(mariadb_url, task_id)
    expected = {int(job["_sim"]["leads_id"]): job["JobId"] for job in late["jobs"]}
    assert {lid: crm.leads[lid]["call_job_id"] for lid in expected} == expected
    assert crm.leads[late_lead]["call_status"] == "Succeeded" and crm.leads[late_lead]["leads_follow_id"]
    assert all(crm.leads[lid]["leads_follow_id"] for lid in expected)


def test_a_cloud_that_caps_the_page_size_has_every_job_listed(mariadb_url, simulator, instance):
    task_id, leads = new_task(mariadb_url, "jg-cap", range(1, 251))
    simulator.state.add_job_group(build_job_group("jg-cap", leads, task_id=task_id, seed=5,
                                                  status_mix={"Succeeded": 0.6, "Failed": 0.4}))
    simulator.state.set_page_size_cap(50)
    result = run_sync(mariadb_url, simulator, task_id, instance, paging={"page_size": 100, "pages_per_batch": 2})
    assert result.success
    crm = snapshot(mariadb_url, task_id)
    assert all(lead["call_job_id"] for lead in crm.leads.values())
    assert all(lead["leads_follow_id"] for lead in crm.leads.values()) and crm.task_type == 4
    # pages planned at the size the cloud answered with: TotalCount, then five pages of 50
    assert requests(simulator)["ListJobsByGroup"] == 1 + 5


def test_a_short_page_fails_its_batch_and_marks_no_lead_failed(mariadb_url, simulator, instance):
    task_id, leads = new_task(mariadb_url, "jg-short", range(1, 251))
    simulator.state.add_job_group(build_job_group("jg-short", leads, task_id=task_id, seed=6,
                                                  status_mix={"Succeeded": 1.0}))
    # page 1 is whole (the plan takes pages of 100), later pages come back of 50
    simulator.state.set_page_size_cap(50, from_page=2)
    result = run_sync(mariadb_url, simulator, task_id, instance, paging={"page_size": 100, "pages_per_batch": 1})
    assert not result.success
    failures = [e for e in result.all_events if e.is_step_failure]
    assert {e.step_key for e in failures} == {"match_job_page[page_2]", "match_job_page[page_3]"}
    assert all("listing is incomplete" in e.step_failure_data.error.to_string() for e in failures)
    crm = snapshot(mariadb_url, task_id)
    # page 1's leads are done; no lead of the pages not listed is marked Failed
    assert sum(bool(lead["call_job_id"]) for lead in crm.leads.values()) == 100
    assert not any(lead["call_status"] == "Failed" for lead in crm.leads.values() if not lead["call_job_id"])
    assert crm.task_type == 2

    # the cloud answers whole pages again: the next run lists them and completes the task
    simulator.state.set_page_size_cap(None)
    assert run_sync(mariadb_url, simulator, task_id, instance, paging={"page_size": 100, "pages_per_batch": 1}).success
    crm = snapshot(mariadb_url, task_id)
    assert all(lead["call_job_id"] and lead["leads_follow_id"] for lead in crm.leads.values())
    assert crm.task_type == 4
