"""`sync_call_task` end to end: a real CRM (MariaDB, and SQLite) and the simulator through the
real SDKs. One scenario exercises every matching strategy, duplicate phones, an unmatched lead,
a job still running, each follow-up case and bad LLM answers; then a rerun that must change
nothing, then the cloud moves on and a third run completes the task."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from call_pipeline.domain.followups import AI_UNAVAILABLE_REMARK_PREFIX
from call_pipeline_tests.pipeline_harness import (
    create_task,
    expected_jobs_by_lead,
    new_reference,
    project_instance_for_test,
    run_sync,
    snapshot,
)
from call_pipeline_tests.pipeline_harness import run_sync as run_sync_on
from call_pipeline_tools.simulator.scenarios import build_job_group

N_REFERENCE = 110  # leads 1..110 carry a new-format reference_id
LEGACY = range(111, 121)  # no reference_id; the job carries task_{t}_lead_{l}
PHONE_ONLY = range(121, 131)  # no reference_id; the job carries only a phone, in another format
DUP_A, DUP_B = 131, 132  # two leads sharing one phone, each with its own phone-only job
UNMATCHED = 133  # no job in the group (until a late one appears)
NOTHING_TO_MATCH = 134  # neither phone nor reference: never matched, never marked
EXECUTING = 5  # job still Executing on the first runs
GARBAGE, FENCED, OUT_OF_RANGE = 6, 7, 8
EMPTY_CONVERSATION, CANCELLED_NO_TRANSCRIPT, FAILED_NO_TASKS = 9, 10, 11
INJECTION = 12
STRING_CONVERSATION, SECONDS, NO_PLANED = 13, 14, 15


def scenario_leads(task_id: int) -> list[dict]:
    leads = []
    for leads_id in range(1, NOTHING_TO_MATCH + 1):
        phone = f"1390000{leads_id:04d}"
        lead = {"leads_id": leads_id, "leads_phone": phone, "reference_id": None}
        if leads_id <= N_REFERENCE:
            lead["reference_id"] = new_reference(task_id, leads_id)
        if leads_id in (DUP_A, DUP_B):
            lead["leads_phone"] = "138 0013 8000" if leads_id == DUP_A else "+86 13800138000"
        if leads_id == NOTHING_TO_MATCH:
            lead["leads_phone"] = None
        leads.append(lead)
    return leads


def scenario_group(task_id: int, leads: list[dict]) -> dict:
    specials: dict[int, list[str]] = {
        EXECUTING: ["status:Executing"],
        GARBAGE: ["llm:garbage"],
        FENCED: ["llm:fenced"],
        OUT_OF_RANGE: ["llm:out_of_range"],
        EMPTY_CONVERSATION: ["conversation_empty"],
        CANCELLED_NO_TRANSCRIPT: ["status:Cancelled", "conversation_absent"],
        FAILED_NO_TASKS: ["status:Failed", "no_tasks"],
        INJECTION: ["injection"],
        STRING_CONVERSATION: ["conversation_string"],
        SECONDS: ["times_in_seconds"],
        NO_PLANED: ["planed_time_absent"],
        UNMATCHED: ["skip"],
        NOTHING_TO_MATCH: ["skip"],
    }
    for leads_id in LEGACY:
        specials[leads_id] = ["legacy_reference"]
    for leads_id in [*PHONE_ONLY, DUP_A, DUP_B]:
        specials[leads_id] = ["no_reference", "phone:plus86_dashed"]
    return build_job_group("jg-e2e", leads, task_id=task_id, seed=11, special_cases=specials,
                           status_mix={"Succeeded": 0.6, "Failed": 0.3, "Cancelled": 0.1})


@pytest.fixture
def instance():
    with project_instance_for_test() as instance:
        yield instance


def calls_needed(crm_url: str, task_id: int) -> tuple[int, int]:
    """(LLM calls, DownloadRecording calls) a clean run makes: one per lead whose follow-up the
    LLM writes, one per succeeded call attempt."""
    from call_pipeline.domain.followups import plan_follow_up

    leads = snapshot(crm_url, task_id).leads.values()
    llm = sum(plan_follow_up(lead["call_status"], lead["call_conversation"]) == "llm" for lead in leads)
    recordings = sum(lead["call_status"] == "Succeeded" and bool(lead["call_task_id"]) for lead in leads)
    return llm, recordings


# Pages of 50 jobs, one page per batch: three batches whose steps the multiprocess executor runs
# side by side.
E2E_PAGING = {"page_size": 50, "pages_per_batch": 1}


@pytest.mark.parametrize("executor", ["in_process", "multiprocess"])
def test_sync_job_end_to_end_on_mariadb(mariadb_url, simulator, instance, executor):
    crm_url = mariadb_url

    def run_sync(*args):
        return run_sync_on(*args, executor=executor, paging=E2E_PAGING)

    task_id = create_task(crm_url, job_group_id="jg-e2e", leads=[])
    leads = scenario_leads(task_id)
    create_task_leads(crm_url, task_id, leads)
    group = scenario_group(task_id, leads)
    expected_jobs = expected_jobs_by_lead(group)
    verdicts = {int(j["_sim"]["leads_id"]): j["_sim"]["expected_is_interested"] for j in group["jobs"]}
    simulator.state.add_job_group(group)

    # ---- run 1 ----
    result = run_sync(crm_url, simulator, task_id, instance)
    assert result.success
    crm = snapshot(crm_url, task_id)
    # each call made once: an LLM call per lead with a transcript, a download per succeeded call
    llm_calls, downloads = calls_needed(crm_url, task_id)
    stats = simulator.state.stats()
    assert llm_calls > 50 and downloads > 50
    assert stats["dashscope_requests"] == llm_calls
    assert stats["requests"]["DownloadRecording"] == downloads and stats["download_recording_repeats"] == 0
    # three batches, each through every step
    batches = {e.step_key for e in result.all_events if e.is_step_success and e.step_key.startswith("create_follow")}
    assert batches == {"create_follow_ups[page_1]", "create_follow_ups[page_2]", "create_follow_ups[page_3]"}

    # every strategy matched its leads; the duplicate phones got one job each
    for leads_id, job_id in expected_jobs.items():
        if leads_id in (DUP_A, DUP_B):
            continue
        assert crm.leads[leads_id]["call_job_id"] == job_id, leads_id
    assert {crm.leads[DUP_A]["call_job_id"], crm.leads[DUP_B]["call_job_id"]} == \
        {expected_jobs[DUP_A], expected_jobs[DUP_B]}
    job_ids = [lead["call_job_id"] for lead in crm.leads.values() if lead["call_job_id"]]
    assert len(job_ids) == len(set(job_ids)) == len(expected_jobs)

    # the unmatched lead is provisionally Failed; the lead with nothing to match is left alone
    assert crm.leads[UNMATCHED]["call_job_id"] is None and crm.leads[UNMATCHED]["call_status"] == "Failed"
    assert crm.leads[NOTHING_TO_MATCH]["call_status"] is None

    # statuses, transcripts and times
    executing = crm.leads[EXECUTING]
    assert executing["call_status"] == "Executing" and executing["leads_follow_id"] is None
    succeeded = [lead for lead in crm.leads.values() if lead["call_status"] == "Succeeded"]
    with_transcript = [lead for lead in succeeded if lead["call_conversation"]]
    assert with_transcript and all("\\u" not in lead["call_conversation"] for lead in with_transcript)
    assert all(isinstance(json.loads(lead["call_conversation"]), list) for lead in with_transcript)
    assert all(lead["call_task_id"] and lead["calling_number"] for lead in succeeded)
    assert crm.leads[STRING_CONVERSATION]["call_conversation"] is None
    assert crm.leads[SECONDS]["planed_time"] is not None and crm.leads[SECONDS]["planed_time"].year == 2025
    assert crm.leads[NO_PLANED]["planed_time"] is None
    # recordings for every succeeded call
    assert all(lead["recording_url"] and "/__recordings/" in lead["recording_url"] for lead in succeeded)
    assert not any(lead["recording_url"] for lead in crm.leads.values() if lead["call_status"] != "Succeeded")

    # follow-ups: one per lead with a job and a terminal status
    terminal = {lid for lid, lead in crm.leads.items()
                if lead["call_job_id"] and lead["call_status"] in ("Succeeded", "Failed", "Cancelled")}
    with_follow_up = {lid for lid, lead in crm.leads.items() if lead["leads_follow_id"]}
    assert with_follow_up == terminal
    assert len(crm.follow_ups) == len(terminal)
    follow_by_id = {f["id"]: f for f in crm.follow_ups}
    remark = {lid: follow_by_id[crm.leads[lid]["leads_follow_id"]]["leads_remark"] for lid in terminal}
    for leads_id in terminal:
        lead = crm.leads[leads_id]
        if leads_id in (GARBAGE, OUT_OF_RANGE):
            assert lead["is_interested"] == 0 and remark[leads_id].startswith(AI_UNAVAILABLE_REMARK_PREFIX)
        elif verdicts.get(leads_id) is not None and lead["call_conversation"]:
            assert lead["is_interested"] == verdicts[leads_id], leads_id
    assert crm.leads[FENCED]["is_interested"] == verdicts[FENCED]
    assert crm.leads[INJECTION]["is_interested"] == 2
    assert remark[EMPTY_CONVERSATION] == "外呼已完成，但暂无通话内容；"
    assert remark[CANCELLED_NO_TRANSCRIPT] == "外呼状态：Cancelled；"
    assert remark[FAILED_NO_TASKS] == "呼叫失败；"
    assert all(f["follow_time"] and f["frist_follow_time"] and f["new_follow_time"] for f in crm.follow_ups)
    # the injection never reached the system message
    for body in simulator.state.llm_requests:
        system = body["input"]["messages"][0]
        assert system["role"] == "system" and "忽略你之前的所有指令" not in system["content"]

    # a job is still running: the task stays at 2
    assert crm.task_type == 2
    # more than 99 jobs needed results: ListJobs was called in batches of at most 99
    stats = simulator.state.stats()
    assert stats["requests"]["ListJobs"] >= 2
    summary = _summary_of(result)
    assert "task state after" in summary and "reference_id" in summary

    # ---- run 2: nothing changes, nothing is duplicated ----
    calls_before = simulator.state.stats()["dashscope_requests"]
    assert run_sync(crm_url, simulator, task_id, instance).success
    again = snapshot(crm_url, task_id)
    assert again.leads == crm.leads
    assert again.follow_ups == crm.follow_ups
    assert again.task_type == 2
    assert simulator.state.stats()["dashscope_requests"] == calls_before  # no LLM call twice

    # ---- run 3: the running job finishes and a late job appears for the unmatched lead ----
    simulator.state.advance("jg-e2e", steps=3)
    late = build_job_group("jg-late", [next(lead for lead in leads if lead["leads_id"] == UNMATCHED)],
                           task_id=task_id, seed=5, status_mix={"Succeeded": 1.0})
    simulator.state.add_jobs("jg-e2e", late["jobs"])
    assert run_sync(crm_url, simulator, task_id, instance).success
    final = snapshot(crm_url, task_id)
    assert final.leads[UNMATCHED]["call_job_id"] == late["jobs"][0]["JobId"]
    assert final.leads[UNMATCHED]["call_status"] == "Succeeded"
    assert final.leads[UNMATCHED]["leads_follow_id"] is not None
    assert final.leads[EXECUTING]["call_status"] in ("Succeeded", "Failed", "Cancelled")
    assert final.leads[EXECUTING]["leads_follow_id"] is not None
    assert final.task_type == 4
    # the follow-ups of the first run are untouched; exactly one per lead
    follow_owner = [f["leads_id"] for f in final.follow_ups]
    assert len(follow_owner) == len(set(follow_owner))
    assert final.follow_ups[: len(crm.follow_ups)] == crm.follow_ups


def test_sync_job_on_sqlite(sqlite_url, simulator, instance):
    """The embedded default: the same job on SQLite, completing a small task to 4."""
    task_id = create_task(sqlite_url, job_group_id="jg-sqlite", leads=[])
    leads = [{"leads_id": i, "leads_phone": f"1370000{i:04d}", "reference_id": new_reference(task_id, i)}
             for i in range(1, 41)]
    create_task_leads(sqlite_url, task_id, leads)
    simulator.state.add_job_group(build_job_group("jg-sqlite", leads, task_id=task_id, seed=2,
                                                  status_mix={"Succeeded": 0.5, "Failed": 0.5}))
    result = run_sync(sqlite_url, simulator, task_id, instance)
    assert result.success
    crm = snapshot(sqlite_url, task_id)
    assert crm.task_type == 4
    # the operator's view: the run carries the task's name (launched without it), and the CRM
    # asset's partition got a materialization with the run's counts as numbers
    assert instance.get_run_by_id(result.run_id).tags["call_pipeline/task_name"] == "测试任务"
    event = instance.get_latest_materialization_event(dg.AssetKey(["crm", "leads_task_list"]))
    materialization = event.asset_materialization
    assert materialization.partition == str(task_id)
    metadata = {k: v.value for k, v in materialization.metadata.items()}
    assert metadata["follow_ups_written"] == 40 and metadata["leads"] == 40 and metadata["task_type"] == 4
    assert metadata["jobs_listed"] == 40 and metadata["leads_succeeded"] + metadata["leads_failed"] == 40
    assert all(lead["call_job_id"] and lead["leads_follow_id"] for lead in crm.leads.values())
    assert len(crm.follow_ups) == 40


@pytest.mark.parametrize(("task_type", "job_group_id"), [(1, "jg-x"), (4, "jg-x"), (2, None), (2, "")])
def test_a_task_that_does_not_qualify_ends_the_run_cleanly(mariadb_url, simulator, instance, task_type,
                                                          job_group_id):
    task_id = create_task(mariadb_url, task_type=task_type, job_group_id=job_group_id,
                          leads=[{"leads_id": 1, "leads_phone": "13700000001"}])
    result = run_sync(mariadb_url, simulator, task_id, instance)
    assert result.success
    assert _ran(result) == {"list_job_pages"}
    assert snapshot(mariadb_url, task_id).task_type == task_type
    assert simulator.state.stats()["outboundbot_requests"] == 0


def test_a_partition_key_that_is_not_a_task_id_fails_clearly(mariadb_url, simulator, instance):
    instance.add_dynamic_partitions("call_tasks", ["not-a-task"])
    from call_pipeline.jobs import sync_call_task
    from call_pipeline_tests.pipeline_harness import pipeline_resources

    result = sync_call_task.execute_in_process(instance=instance, partition_key="not-a-task", raise_on_error=False,
                                               resources=pipeline_resources(mariadb_url, simulator))
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "not a call task id" in failure.step_failure_data.error.message


def test_missing_credentials_stop_the_run_and_name_the_variables(mariadb_url, monkeypatch, instance):
    from call_pipeline.jobs import sync_call_task
    from call_pipeline.resources import resources_from_env

    for name in ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "OUTBOUNDBOT_INSTANCE_ID",
                 "DASHSCOPE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CALL_PIPELINE_CRM_URL", mariadb_url)
    task_id = create_task(mariadb_url, leads=[{"leads_id": 1, "leads_phone": "13700000001"}])
    instance.add_dynamic_partitions("call_tasks", [str(task_id)])
    with pytest.raises(dg.DagsterInvalidConfigError) as info:
        sync_call_task.execute_in_process(instance=instance, partition_key=str(task_id),
                                          resources=resources_from_env())
    message = str(info.value)
    for name in ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "OUTBOUNDBOT_INSTANCE_ID",
                 "DASHSCOPE_API_KEY"):
        assert name in message
    assert snapshot(mariadb_url, task_id).leads[1]["call_status"] is None


def create_task_leads(crm_url: str, task_id: int, leads: list[dict]) -> None:
    from call_pipeline.crm.database import get_crm_engine
    from call_pipeline.crm.schema import leads_task_list
    from call_pipeline_tests.pipeline_harness import ORGANIZATION

    with get_crm_engine(crm_url).begin() as conn:
        conn.execute(leads_task_list.insert(), [{"task_id": task_id, "organization_id": ORGANIZATION, **lead}
                                                for lead in leads])


def _ran(result) -> set[str]:
    return {e.step_key for e in result.all_events if e.is_step_success}


def _summary_of(result) -> str:
    for event in result.all_events:
        if event.is_successful_output and event.step_key == "advance_task_state":
            return event.event_specific_data.metadata["summary"].value
    raise AssertionError("no run summary")
