"""Contract §12 end to end, on MariaDB and the simulator through the real SDKs: an LLM outage is
not a verdict (no follow-up, the run fails naming it, a later run asks again), and a unit of one
lead that keeps failing is given up after CALL_PIPELINE_MAX_UNIT_ATTEMPTS runs (named in the
summary and the per-task history, one alert), so that its task reaches its state."""

from __future__ import annotations

import dagster as dg
import pytest
import sqlalchemy as sa

from call_pipeline.crm import repository as repo
from call_pipeline.crm.database import get_crm_engine
from call_pipeline.crm.schema import call_pipeline_unit_failures
from call_pipeline.domain.followups import AI_UNAVAILABLE_REMARK_PREFIX
from call_pipeline.ops import LATE_JOBS_TAG
from call_pipeline.sensors import alert_for, failure_alert_sensor
from call_pipeline.settings import settings
from call_pipeline_tests.pipeline_harness import (
    create_task,
    new_reference,
    project_instance_for_test,
    run_sync,
    snapshot,
)
from call_pipeline_tests.test_alerts import webhook  # noqa: F401 - the local HTTP server fixture
from call_pipeline_tools.simulator.scenarios import build_job_group

INTERESTED = (1, 2)
NOT_INTERESTED = (3,)
FAILED_CALL = 4  # no transcript: its basic record needs no LLM
POISON_RECORDING = 5  # DownloadRecording answers 404 Recording.NotExist, every time
DELETED_JOB = 6  # ListJobs no longer returns its job


@pytest.fixture
def instance():
    with project_instance_for_test() as instance:
        yield instance


def make_task(crm_url: str, simulator, group_id: str, count: int = 6,
              extra: dict[int, list[str]] | None = None) -> tuple[int, dict]:
    task_id = create_task(crm_url, job_group_id=group_id, leads=[])
    leads = [{"leads_id": i, "leads_phone": f"1390000{i:04d}", "reference_id": new_reference(task_id, i)}
             for i in range(1, count + 1)]
    engine = get_crm_engine(crm_url)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO leads_task_list (task_id, leads_id, organization_id, leads_phone, "
                             "reference_id) VALUES (:t, :l, 9, :p, :r)"),
                     [{"t": task_id, "l": lead["leads_id"], "p": lead["leads_phone"], "r": lead["reference_id"]}
                      for lead in leads])
    specials = {i: ["intent:interested_price"] for i in INTERESTED}
    specials.update({i: ["intent:not_interested_bought"] for i in NOT_INTERESTED})
    specials[FAILED_CALL] = ["status:Failed", "no_tasks"]
    for leads_id, more in (extra or {}).items():
        specials[leads_id] = [*specials.get(leads_id, []), *more]
    group = build_job_group(group_id, leads, task_id=task_id, seed=5, special_cases=specials,
                            status_mix={"Succeeded": 1.0})
    simulator.state.add_job_group(group)
    jobs = {int(job["_sim"]["leads_id"]): job for job in group["jobs"]}
    return task_id, jobs


def failure_text(result) -> str:
    """Every step failure's message, with its causes."""
    texts = []
    for event in result.all_events:
        if event.is_step_failure:
            error = event.step_failure_data.error
            while error is not None:
                texts.append(error.message)
                error = error.cause or error.context
    return "\n".join(texts)


def failure_context(instance, result) -> dg.RunFailureSensorContext:
    failure = next(r for r in instance.all_logs(result.run_id)
                   if r.dagster_event and r.dagster_event.event_type_value == "PIPELINE_FAILURE")
    return dg.build_run_status_sensor_context(
        sensor_name=failure_alert_sensor.name, dagster_event=failure.dagster_event, dagster_instance=instance,
        dagster_run=instance.get_run_by_id(result.run_id)).for_run_failure()


def unit_failures(crm_url: str, task_id: int) -> list[dict]:
    with get_crm_engine(crm_url).connect() as conn:
        return [dict(r._mapping) for r in conn.execute(
            sa.select(call_pipeline_unit_failures).where(call_pipeline_unit_failures.c.task_id == task_id))]


def test_an_llm_outage_writes_no_verdict_and_a_later_run_asks_again(mariadb_url, simulator, instance,
                                                                    monkeypatch):
    monkeypatch.setattr(settings(), "max_unit_attempts", 2)
    task_id, jobs = make_task(mariadb_url, simulator, "jg-arrears", count=4)
    simulator.state.inject_fault(action="dashscope", status=400, code="Arrearage", times=None)

    # two runs in arrears (as many as the give-up limit): an outage is never counted against a lead
    for _ in range(2):
        result = run_sync(mariadb_url, simulator, task_id, instance)
        assert not result.success
        text = failure_text(result)
        assert "LLM outage (Arrearage)" in text and "no verdict written" in text
        assert "LLM outage (Arrearage)" in alert_for(failure_context(instance, result)).error
        crm = snapshot(mariadb_url, task_id)
        for leads_id in (*INTERESTED, *NOT_INTERESTED):  # each has a transcript
            assert crm.leads[leads_id]["leads_follow_id"] is None, leads_id
            assert crm.leads[leads_id]["is_interested"] is None, leads_id
        # the other leads' work is saved: the failed call's basic record, the recordings
        assert crm.leads[FAILED_CALL]["leads_follow_id"] is not None
        assert all(crm.leads[i]["recording_url"] for i in (*INTERESTED, *NOT_INTERESTED))
        assert crm.task_type == 2
    assert all(f["leads_remark"] and AI_UNAVAILABLE_REMARK_PREFIX not in f["leads_remark"] for f in crm.follow_ups)
    assert not [u for u in unit_failures(mariadb_url, task_id) if u["unit"] == "follow_up"]

    simulator.state.clear_faults()
    result = run_sync(mariadb_url, simulator, task_id, instance)
    assert result.success
    crm = snapshot(mariadb_url, task_id)
    for leads_id in (*INTERESTED, *NOT_INTERESTED):
        assert crm.leads[leads_id]["is_interested"] == jobs[leads_id]["_sim"]["expected_is_interested"], leads_id
    assert [crm.leads[i]["is_interested"] for i in INTERESTED] == [1, 1]
    assert crm.task_type == 4
    assert not any(AI_UNAVAILABLE_REMARK_PREFIX in (f["leads_remark"] or "") for f in crm.follow_ups)
    assert len(crm.follow_ups) == 4


def test_a_unit_that_keeps_failing_is_given_up_and_the_task_concludes(crm_url, simulator, instance,
                                                                        monkeypatch, webhook):  # noqa: F811
    mariadb_url = crm_url  # and SQLite, the embedded default
    url, received = webhook
    monkeypatch.setattr(settings(), "max_unit_attempts", 2)
    monkeypatch.setattr(settings(), "alert_webhook_url", url)
    monkeypatch.setattr(settings(), "alert_format", "json")
    task_id, jobs = make_task(mariadb_url, simulator, "jg-poison")
    poison_job, deleted_job = jobs[POISON_RECORDING]["JobId"], jobs[DELETED_JOB]["JobId"]
    simulator.state.inject_fault(action="DownloadRecording", status=404, code="Recording.NotExist",
                                 job_ids=[poison_job], times=None)
    simulator.state.set_jobs_gone([deleted_job])

    # run 1: the poison recording fails the run (its op's retry in the same run counts once),
    # after the rest is saved
    result = run_sync(mariadb_url, simulator, task_id, instance)
    assert not result.success
    assert "Recording.NotExist" in failure_text(result)
    crm = snapshot(mariadb_url, task_id)
    assert all(crm.leads[i]["leads_follow_id"] for i in (*INTERESTED, *NOT_INTERESTED, FAILED_CALL))
    assert crm.leads[POISON_RECORDING]["recording_url"] is None
    assert crm.leads[DELETED_JOB]["call_status"] is None
    counted = {u["unit"]: u for u in unit_failures(mariadb_url, task_id)}
    assert counted["recording"]["attempts"] == 1 and counted["call_result"]["attempts"] == 1
    assert not counted["recording"]["given_up"]
    assert received == []

    # run 2: both units failed in 2 runs: given up; the run succeeds and the task concludes
    result = run_sync(mariadb_url, simulator, task_id, instance)
    assert result.success, failure_text(result)
    crm = snapshot(mariadb_url, task_id)
    assert crm.task_type == 4
    assert crm.leads[POISON_RECORDING]["recording_url"] is None
    assert crm.leads[POISON_RECORDING]["leads_follow_id"] is not None
    assert crm.leads[DELETED_JOB]["call_status"] == "Failed"
    assert crm.leads[DELETED_JOB]["is_interested"] == 0
    with get_crm_engine(mariadb_url).connect() as conn:  # the sensor sees no work left for the task
        assert repo.count_lead_work(conn, [task_id])[task_id].work_left == 0
    materialization = next(e for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION")
    metadata = materialization.event_specific_data.materialization.metadata
    assert metadata["units_given_up"].value == 2
    summary = metadata["summary"].value
    assert f"lead {POISON_RECORDING} (job {poison_job}): recording failed in 2 runs" in summary
    assert "Recording.NotExist" in summary
    assert f"lead {DELETED_JOB} (job {deleted_job}): call result failed in 2 runs" in summary
    assert len(received) == 1
    alert = received[0]
    assert alert["task_id"] == str(task_id) and alert["step"] == "units given up"
    assert f"lead {POISON_RECORDING}" in alert["error"] and f"lead {DELETED_JOB}" in alert["error"]

    # run 3 (a task at 4 runs again when its group grows): the given-up recording is not asked
    # for again, no second alert, nothing named again
    downloads = simulator.state.stats()["requests"]["DownloadRecording"]
    result = run_sync(mariadb_url, simulator, task_id, instance, tags={LATE_JOBS_TAG: "true"})
    assert result.success
    assert simulator.state.stats()["requests"]["DownloadRecording"] == downloads
    assert len(received) == 1
    materialization = next(e for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION")
    assert materialization.event_specific_data.materialization.metadata["units_given_up"].value == 0


def test_a_follow_up_that_only_its_lead_keeps_failing_is_given_up(mariadb_url, simulator, instance, monkeypatch):
    """The service answers every lead but one, whose request it fails every time (a 500 past the
    retries): that is the lead's, not an outage of the account, so it counts; after 2 runs the
    lead gets the basic record and the task concludes."""
    monkeypatch.setattr(settings(), "max_unit_attempts", 2)
    task_id, _ = make_task(mariadb_url, simulator, "jg-poison-llm", count=4, extra={3: ["llm:poison"]})
    simulator.state.inject_fault(action="dashscope", status=500, code="InternalError", times=None,
                                 match_text="[[llm:poison]]")

    result = run_sync(mariadb_url, simulator, task_id, instance)
    assert not result.success and "LLM outage (InternalError)" in failure_text(result)
    crm = snapshot(mariadb_url, task_id)
    assert crm.leads[3]["leads_follow_id"] is None
    assert crm.leads[1]["is_interested"] == 1 and crm.leads[2]["is_interested"] == 1

    result = run_sync(mariadb_url, simulator, task_id, instance)
    assert result.success, failure_text(result)
    crm = snapshot(mariadb_url, task_id)
    assert crm.leads[3]["is_interested"] == 0 and crm.task_type == 4
    remark = next(f["leads_remark"] for f in crm.follow_ups if f["id"] == crm.leads[3]["leads_follow_id"])
    assert remark.startswith(AI_UNAVAILABLE_REMARK_PREFIX) and "InternalError" in remark
    summary = next(e for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"
                   ).event_specific_data.materialization.metadata["summary"].value
    assert "lead 3 (job " in summary and "follow up failed in 2 runs" in summary
