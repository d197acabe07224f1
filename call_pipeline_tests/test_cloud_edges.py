"""The real cloud's edges (SPEC §12) in `sync_call_task` runs against MariaDB and the simulator,
through the real SDKs: the latest call attempt whatever the order of `Tasks`, a transcript that
comes late, masked phone numbers."""

from __future__ import annotations

import json
import time

import pytest

from call_pipeline.settings import settings
from call_pipeline_tests.pipeline_harness import (
    create_task,
    new_reference,
    project_instance_for_test,
    run_sync,
    snapshot,
)
from call_pipeline_tests.test_sync_job import create_task_leads
from call_pipeline_tools.simulator.scenarios import build_job_group


@pytest.fixture
def instance():
    with project_instance_for_test() as instance:
        yield instance


def a_task(crm_url: str, simulator, group_id: str, n: int, specials: dict, *, seed: int = 7,
           phones: dict | None = None, references: bool = True) -> tuple[int, dict]:
    task_id = create_task(crm_url, job_group_id=group_id, leads=[])
    leads = [{"leads_id": i, "leads_phone": (phones or {}).get(i, f"1350000{i:04d}"),
              "reference_id": new_reference(task_id, i) if references else None} for i in range(1, n + 1)]
    create_task_leads(crm_url, task_id, leads)
    group = build_job_group(group_id, leads, task_id=task_id, seed=seed, special_cases=specials,
                            status_mix={"Succeeded": 1.0})
    simulator.state.add_job_group(group)
    return task_id, group


def job_of(group: dict, leads_id: int) -> dict:
    return next(job for job in group["jobs"] if job["_sim"]["leads_id"] == leads_id)


# ---- the latest call attempt ----------------------------------------------------------------


def test_the_answered_attempt_listed_first_is_the_one_stored(mariadb_url, simulator, instance):
    task_id, group = a_task(mariadb_url, simulator, "jg-latest", 6, {1: "answered_first", 2: "answered_first"})
    result = run_sync(mariadb_url, simulator, task_id, instance)
    assert result.success
    crm = snapshot(mariadb_url, task_id)
    for leads_id in (1, 2):
        served = job_of(group, leads_id)["Tasks"]
        answered, unanswered = served[0], served[-1]
        assert len(served) == 2 and answered["Conversation"] and not unanswered["Conversation"]
        assert answered["ActualTime"] > unanswered["ActualTime"]
        lead = crm.leads[leads_id]
        assert lead["call_task_id"] == answered["TaskId"]
        assert lead["calling_number"] == answered["CallingNumber"]
        stored = json.loads(lead["call_conversation"])
        assert [e["Script"] for e in stored] == [e["Script"] for e in answered["Conversation"]]
        assert f"/__recordings/{answered['TaskId']}." in lead["recording_url"]
        # the follow-up is the model's reading of the answered call, not "no conversation"
        follow_up = next(f for f in crm.follow_ups if f["id"] == lead["leads_follow_id"])
        assert follow_up["leads_remark"] != "外呼已完成，但暂无通话内容；"
        assert lead["is_interested"] == job_of(group, leads_id)["_sim"]["expected_is_interested"]


# ---- masked numbers -------------------------------------------------------------------------


def test_masked_numbers_match_nobody_and_the_run_says_so_once(mariadb_url, simulator, instance):
    # no references: phones are all there is to match by; leads 2 and 5 come masked, in two batches
    masked = {2: ["no_reference", "phone:masked"], 5: ["no_reference", "phone:masked"]}
    specials = {i: masked.get(i, ["no_reference", "phone:plain"]) for i in range(1, 7)}
    task_id, group = a_task(mariadb_url, simulator, "jg-masked", 6, specials, references=False)
    assert job_of(group, 2)["Contacts"][0]["PhoneNumber"] == "135****0002"
    result = run_sync(mariadb_url, simulator, task_id, instance, paging={"page_size": 3, "pages_per_batch": 1})
    assert result.success
    crm = snapshot(mariadb_url, task_id)
    for leads_id in (2, 5):
        assert crm.leads[leads_id]["call_job_id"] is None and crm.leads[leads_id]["call_status"] == "Failed"
    assert all(crm.leads[i]["call_job_id"] == job_of(group, i)["JobId"] for i in (1, 3, 4, 6))
    lines = [e.message for e in instance.all_logs(result.run_id) if "masked phone" in (e.message or "")]
    assert len(lines) == 1, lines
    assert f"task {task_id}: 2 job(s) carry a masked phone number" in lines[0]
    assert f"job {job_of(group, 2)['JobId']}" in lines[0] and f"job {job_of(group, 5)['JobId']}" in lines[0]


# ---- a transcript that comes late -----------------------------------------------------------

NO_CONVERSATION = "外呼已完成，但暂无通话内容；"


def test_a_late_transcript_is_waited_for_and_analysed_when_it_comes(mariadb_url, simulator, instance, monkeypatch):
    monkeypatch.setattr(settings(), "transcript_grace_seconds", 300)
    task_id, group = a_task(mariadb_url, simulator, "jg-late", 4, {1: "transcript_late:3600"})
    late = job_of(group, 1)
    assert run_sync(mariadb_url, simulator, task_id, instance).success
    crm = snapshot(mariadb_url, task_id)
    lead = crm.leads[1]
    # within the grace: stored as Succeeded, no follow-up yet, the task not concluded
    assert lead["call_status"] == "Succeeded" and lead["call_conversation"] is None
    assert lead["leads_follow_id"] is None and lead["is_interested"] is None
    assert all(crm.leads[i]["leads_follow_id"] for i in (2, 3, 4))
    assert crm.task_type == 3
    llm_calls = simulator.state.stats()["dashscope_requests"]

    # a run while it is still missing changes nothing, and asks ListJobs about that job only
    simulator.state.reset_stats()
    assert run_sync(mariadb_url, simulator, task_id, instance).success
    assert snapshot(mariadb_url, task_id).leads[1]["leads_follow_id"] is None
    assert simulator.state.stats()["requests"].get("ListJobs") == 1

    simulator.state.release_late_transcripts([late["JobId"]])
    assert run_sync(mariadb_url, simulator, task_id, instance).success
    crm = snapshot(mariadb_url, task_id)
    lead = crm.leads[1]
    assert [e["Script"] for e in json.loads(lead["call_conversation"])] == [
        e["Script"] for e in late["Tasks"][-1]["Conversation"]]
    follow_up = next(f for f in crm.follow_ups if f["id"] == lead["leads_follow_id"])
    assert follow_up["leads_remark"] != NO_CONVERSATION
    assert lead["is_interested"] == late["_sim"]["expected_is_interested"]
    assert simulator.state.stats()["dashscope_requests"] == 1 and llm_calls == 3
    assert crm.task_type == 4


def test_a_transcript_that_never_comes_gets_the_basic_record_after_the_grace(mariadb_url, simulator, instance,
                                                                           monkeypatch):
    monkeypatch.setattr(settings(), "transcript_grace_seconds", 300)
    task_id, group = a_task(mariadb_url, simulator, "jg-never", 2, {1: "transcript_late:3600"})
    loaded = time.time()
    assert run_sync(mariadb_url, simulator, task_id, instance).success
    assert snapshot(mariadb_url, task_id).leads[1]["leads_follow_id"] is None

    # the grace passes (a grace of 1 s, two seconds after the call ended as the job was loaded)
    monkeypatch.setattr(settings(), "transcript_grace_seconds", 1)
    time.sleep(max(0.0, loaded + 2 - time.time()))
    assert run_sync(mariadb_url, simulator, task_id, instance).success
    crm = snapshot(mariadb_url, task_id)
    lead = crm.leads[1]
    assert lead["call_conversation"] is None and lead["is_interested"] == 0
    follow_up = next(f for f in crm.follow_ups if f["id"] == lead["leads_follow_id"])
    assert follow_up["leads_remark"] == NO_CONVERSATION
    assert crm.task_type == 4
