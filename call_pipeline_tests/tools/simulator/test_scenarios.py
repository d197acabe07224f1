"""Scenario building, the job life cycle (advance), and loading groups through the control plane."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import requests
import sqlalchemy as sa
from alibabacloud_outboundbot20191226 import models as ob

from call_pipeline.domain.phones import normalize_phone
from call_pipeline_tools.simulator import scenarios
from call_pipeline_tools.simulator.state import SimulatorState


def _leads(n: int, *, with_reference: bool = True, start: int = 100) -> list[dict]:
    return [{"leads_id": start + i, "reference_id": f"71{start + i}" if with_reference else None,
             "leads_phone": f"138{start + i:08d}", "organization_id": 1} for i in range(n)]


def test_deterministic_given_the_seed():
    a = scenarios.build_job_group("jg-1", _leads(50), task_id=7, seed=3)
    b = scenarios.build_job_group("jg-1", _leads(50), task_id=7, seed=3)
    c = scenarios.build_job_group("jg-1", _leads(50), task_id=7, seed=4)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert json.dumps(a, sort_keys=True) != json.dumps(c, sort_keys=True)
    other_group = scenarios.build_job_group("jg-2", _leads(50), task_id=7, seed=3)
    assert not {j["JobId"] for j in a["jobs"]} & {j["JobId"] for j in other_group["jobs"]}


def test_status_mix_is_exact_and_tasks_fit_the_status():
    group = scenarios.build_job_group("jg-1", _leads(200), task_id=7, seed=1,
                                      status_mix={"Succeeded": 0.5, "Failed": 0.25, "Cancelled": 0.05,
                                                  "Executing": 0.1, "Scheduling": 0.1})
    counts = Counter(j["Status"] for j in group["jobs"])
    assert counts == {"Succeeded": 100, "Failed": 50, "Cancelled": 10, "Executing": 20, "Scheduling": 20}
    for job in group["jobs"]:
        tasks = job["Tasks"]
        if job["Status"] == "Succeeded":
            assert 1 <= len(tasks) <= 2 and tasks[-1]["Status"].startswith("Succeeded")
            assert tasks[-1]["Conversation"] and job["_sim"]["expected_is_interested"] in (0, 1, 2)
            assert {e["Speaker"] for e in tasks[-1]["Conversation"]} == {"Robot", "Contact"}
        elif job["Status"] == "Failed":
            assert tasks and not any(t["Conversation"] for t in tasks) and job["FailureReason"]
        elif job["Status"] == "Scheduling":
            assert tasks == [] and job["_sim"]["outcome"]["Status"] in ("Succeeded", "Failed", "Cancelled")
        elif job["Status"] == "Executing":
            assert [t["Status"] for t in tasks] == ["Executing"] and tasks[0]["Conversation"] == []
        for t in tasks:
            assert t["PlanedTime"] <= t["ActualTime"]
            if "EndTime" in t:
                assert t["ActualTime"] <= t["EndTime"]


def test_references_and_phone_formats():
    leads = _leads(40, with_reference=False) + _leads(20, start=500)
    group = scenarios.build_job_group("jg-1", leads, task_id=7, seed=2, legacy_reference_fraction=0.5)
    refs = Counter()
    formats = set()
    by_lead = {lead["leads_id"]: lead for lead in leads}
    for job in group["jobs"]:
        contact = job["Contacts"][0]
        lead = by_lead[job["_sim"]["leads_id"]]
        ref = contact.get("ReferenceId")
        if lead["reference_id"]:
            assert ref == lead["reference_id"]
        elif ref:
            assert ref == f"task_7_lead_{lead['leads_id']}"
        refs["legacy" if ref and ref.startswith("task_") else "reference" if ref else "none"] += 1
        assert normalize_phone(contact["PhoneNumber"]) == lead["leads_phone"]
        formats.add(contact["PhoneNumber"].replace(lead["leads_phone"][3:7], "X").replace(lead["leads_phone"], "P"))
    assert refs["legacy"] > 0 and refs["none"] > 0 and refs["reference"] == 20
    assert len(formats) >= 4
    assert scenarios.format_phone("13800000001", "plus86_dashed") == "+86 138-0000-0001"
    assert scenarios.format_phone("13800000001", "0086") == "0086 13800000001"
    assert scenarios.format_phone("13800000001", "spaced") == "138 0000 0001"


def test_special_cases():
    leads = _leads(16)
    ids = [lead["leads_id"] for lead in leads]
    specials = {ids[0]: "no_tasks", ids[1]: "conversation_string", ids[2]: "times_in_seconds",
                ids[3]: "planed_time_zero", ids[4]: "planed_time_absent", ids[5]: "unknown_status",
                ids[6]: "injection", ids[7]: ["llm:garbage"], ids[8]: "skip", ids[9]: "no_reference",
                ids[10]: "tasks_absent", ids[11]: "conversation_absent", ids[12]: ["status:Failed", "no_tasks"],
                ids[13]: "intent:interested_price", ids[14]: "phone:0086"}
    group = scenarios.build_job_group("jg-1", leads, task_id=7, seed=5, special_cases=specials,
                                      status_mix={"Failed": 1.0}, orphan_jobs=2)
    jobs = {j["_sim"]["leads_id"]: j for j in group["jobs"]}
    assert ids[8] not in jobs and len(group["jobs"]) == 15 + 2
    assert sum(1 for j in group["jobs"] if j["_sim"]["leads_id"] is None) == 2
    assert jobs[ids[0]]["Tasks"] == [] and jobs[ids[0]]["Status"] == "Succeeded"
    convo = jobs[ids[1]]["Tasks"][-1]["Conversation"]
    assert isinstance(convo, str) and "客户：" in convo
    assert all(t["PlanedTime"] < 10**11 for t in jobs[ids[2]]["Tasks"])
    assert all(e["Timestamp"] < 10**11 for e in jobs[ids[2]]["Tasks"][-1]["Conversation"])
    assert all(t["PlanedTime"] == 0 for t in jobs[ids[3]]["Tasks"])
    assert all("PlanedTime" not in t for t in jobs[ids[4]]["Tasks"])
    assert jobs[ids[5]]["Status"] == "Archived"
    assert any(e["Script"] == scenarios.INJECTION_LINE for e in jobs[ids[6]]["Tasks"][-1]["Conversation"])
    assert jobs[ids[6]]["_sim"]["expected_is_interested"] == 2
    assert any(e["Script"] == "[[llm:garbage]]" for e in jobs[ids[7]]["Tasks"][-1]["Conversation"])
    assert "ReferenceId" not in jobs[ids[9]] and not jobs[ids[9]]["Contacts"][0].get("ReferenceId")
    assert "Tasks" not in jobs[ids[10]]
    assert "Conversation" not in jobs[ids[11]]["Tasks"][-1]
    assert jobs[ids[12]]["Status"] == "Failed" and jobs[ids[12]]["Tasks"] == []
    assert jobs[ids[13]]["_sim"]["intent"] == "interested_price" and jobs[ids[13]]["Status"] == "Succeeded"
    assert jobs[ids[14]]["Contacts"][0]["PhoneNumber"].startswith("0086 ")


def test_build_from_crm(tmp_path):
    url = f"sqlite:///{tmp_path / 'crm.sqlite3'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE call_tasks (id INTEGER PRIMARY KEY, task_name TEXT, "
                             "organization_id INTEGER, task_type INTEGER, job_group_id TEXT)"))
        conn.execute(sa.text("CREATE TABLE leads_task_list (id INTEGER PRIMARY KEY, task_id INTEGER, "
                             "leads_id INTEGER, organization_id INTEGER, leads_phone TEXT, reference_id TEXT)"))
        conn.execute(sa.text("INSERT INTO call_tasks VALUES (5, 't', 1, 2, 'jg-crm'), (6, 'u', 1, 2, NULL)"))
        for i in range(12):
            conn.execute(sa.text("INSERT INTO leads_task_list (task_id, leads_id, organization_id, leads_phone, "
                                 "reference_id) VALUES (5, :l, 1, :p, :r)"),
                         {"l": 900 + i, "p": f"139{i:08d}", "r": f"51{900 + i}" if i % 2 else None})
    engine.dispose()
    group = scenarios.build_job_group_from_crm(url, 5, seed=1)
    assert group["JobGroupId"] == "jg-crm" and len(group["jobs"]) == 12
    assert sorted(j["_sim"]["leads_id"] for j in group["jobs"]) == list(range(900, 912))
    with pytest.raises(ValueError, match="job_group_id"):
        scenarios.build_job_group_from_crm(url, 6)
    assert scenarios.build_job_group_from_crm(url, 6, job_group_id="jg-x")["jobs"] == []


def test_scenario_file_round_trip(tmp_path):
    group = scenarios.build_job_group("jg-f", _leads(5), task_id=1)
    path = tmp_path / "scenario.json"
    scenarios.save_scenario_file(path, [group])
    loaded = scenarios.load_scenario_file(path)
    assert loaded == [group]
    state = SimulatorState()
    assert state.load_scenario(json.loads(path.read_text(encoding="utf-8"))) == ["jg-f"]
    assert all("_sim" not in j for j in state.jobs_of_group("jg-f"))


def test_advance_moves_jobs_to_their_planned_outcome():
    group = scenarios.build_job_group("jg-1", _leads(30), task_id=7, seed=9,
                                      status_mix={"Scheduling": 0.5, "Executing": 0.3, "Drafted": 0.1,
                                                  "Succeeded": 0.1})
    plans = {j["JobId"]: j["_sim"].get("outcome") for j in group["jobs"]}
    state = SimulatorState()
    state.add_job_group(group)

    result = state.advance("jg-1")
    jobs = {j["JobId"]: j for j in state.jobs_of_group("jg-1")}
    before = {j["JobId"]: j["Status"] for j in group["jobs"]}
    for job_id, job in jobs.items():
        if before[job_id] == "Scheduling":
            assert job["Status"] == "Executing"
            assert [t["Status"] for t in job["Tasks"]] in ([], ["Executing"])
            assert all(not t["Conversation"] for t in job["Tasks"])
        elif before[job_id] == "Executing":
            assert job["Status"] == plans[job_id]["Status"]
            assert job["Tasks"] == plans[job_id]["Tasks"]
        elif before[job_id] == "Drafted":
            assert job["Status"] == "Scheduling"
    assert result["moved"] == 27

    state.advance("jg-1", steps=3)
    statuses = Counter(j["Status"] for j in state.jobs_of_group("jg-1"))
    assert set(statuses) <= {"Succeeded", "Failed", "Cancelled"}
    assert state.advance("jg-1")["moved"] == 0
    finished = [j for j in state.jobs_of_group("jg-1") if j["Status"] == "Succeeded"]
    assert finished and all(j["Tasks"][-1]["Conversation"] for j in finished)


def test_advance_a_job_loaded_without_a_plan():
    state = SimulatorState()
    state.add_job_group({"JobGroupId": "jg-raw", "jobs": [
        {"JobId": "job-raw", "Status": "Scheduling", "Contacts": [{"PhoneNumber": "13800000001"}]}]})
    state.advance("jg-raw", steps=2)
    job = state.get_job("job-raw")
    assert job["Status"] in ("Succeeded", "Failed") and job["Tasks"]
    again = SimulatorState()
    again.add_job_group({"JobGroupId": "jg-raw", "jobs": [
        {"JobId": "job-raw", "Status": "Scheduling", "Contacts": [{"PhoneNumber": "13800000001"}]}]})
    again.advance("jg-raw", steps=2)
    assert again.get_job("job-raw") == job  # deterministic


def test_set_job_status():
    group = scenarios.build_job_group("jg-1", _leads(4), task_id=7, seed=1, status_mix={"Executing": 1})
    state = SimulatorState()
    state.add_job_group(group)
    job = group["jobs"][0]
    outcome = job["_sim"]["outcome"]
    after = state.set_job_status(job["JobId"], outcome["Status"])
    assert after["Tasks"] == outcome["Tasks"]
    after = state.set_job_status(job["JobId"], "Succeeded", conversation="一段不是列表的对话")
    assert after["Tasks"][-1]["Conversation"] == "一段不是列表的对话"
    with pytest.raises(KeyError):
        state.set_job_status("no-such-job", "Failed")


def test_job_groups_late_jobs_and_advance_over_http(sim, client):
    group = scenarios.build_job_group("jg-http", _leads(10), task_id=3, seed=2,
                                      status_mix={"Scheduling": 1.0})
    late = scenarios.build_job_group("jg-http", _leads(3, start=900), task_id=3, seed=99,
                                     status_mix={"Succeeded": 1.0})["jobs"]
    resp = requests.post(f"{sim.url}/__sim/job_groups", json={"job_groups": [group]})
    assert resp.json() == {"ok": True, "job_group_ids": ["jg-http"]}

    def total() -> int:
        return client.list_jobs_by_group(ob.ListJobsByGroupRequest(
            instance_id="i", job_group_id="jg-http", page_number=1, page_size=100)).body.jobs.total_count

    assert total() == 10
    assert requests.post(f"{sim.url}/__sim/jobs", json={"job_group_id": "jg-http", "jobs": late}).json()["added"] == 3
    assert total() == 13
    resp = requests.post(f"{sim.url}/__sim/advance", json={"job_group_id": "jg-http", "steps": 2}).json()
    assert resp["moved"] == 20 and "Scheduling" not in resp["statuses"]
    progress = client.describe_job_group(ob.DescribeJobGroupRequest(
        instance_id="i", job_group_id="jg-http")).body.job_group.progress
    assert progress.total_completed == 13
    assert requests.post(f"{sim.url}/__sim/advance", json={"job_group_id": "nope"}).status_code == 400
    # Duplicate job ids are refused rather than silently doubled.
    assert requests.post(f"{sim.url}/__sim/jobs", json={"job_group_id": "jg-http", "jobs": late}).status_code == 400


def test_loading_groups_replaces_and_refuses_duplicate_job_ids():
    state = SimulatorState()
    group = scenarios.build_job_group("jg-1", _leads(5), task_id=1)
    state.add_job_group(group)
    state.add_job_group(group)  # reloading a group replaces it
    assert len(state.jobs_of_group("jg-1")) == 5
    clash = dict(group, JobGroupId="jg-2")
    with pytest.raises(ValueError, match="duplicate JobId"):
        state.add_job_group(clash)
    assert state.job_group_ids() == ["jg-1"]
    with pytest.raises(KeyError):
        state.add_jobs("jg-nope", [])
