"""The simulator's late transcript (`transcript_late:<N>`): the answered call ends as the job turns
Succeeded, and its Conversation shows N seconds later (or at once, when released)."""

import time

from call_pipeline_tools.simulator.scenarios import build_job_group
from call_pipeline_tools.simulator.state import SimulatorState, last_task

LEADS = [{"leads_id": i, "leads_phone": f"1370000000{i}", "reference_id": f"r{i}"} for i in (1, 2)]


def test_the_transcript_appears_n_seconds_after_the_job_turns_succeeded():
    state = SimulatorState()
    group = build_job_group("jg", LEADS, task_id=1, seed=2, special_cases={1: "transcript_late:2"})
    planned = group["jobs"][0]["Tasks"][-1]["Conversation"]
    before = time.time()
    state.add_job_group(group)
    job = state.get_job(group["jobs"][0]["JobId"])
    attempt = last_task(job)
    assert job["Status"] == "Succeeded" and attempt["Conversation"] == []
    ended_ms = attempt["ActualTime"] + attempt["Duration"] * 1000
    assert before * 1000 - 1000 <= ended_ms <= time.time() * 1000 + 1000  # the call ended as it turned Succeeded
    assert state.release_late_transcripts(now=before + 1.5) == 0
    assert last_task(state.get_job(job["JobId"]))["Conversation"] == []
    assert state.release_late_transcripts(now=time.time() + 2.01) == 1
    shown = last_task(state.get_job(job["JobId"]))["Conversation"]
    assert [e["Script"] for e in shown] == [e["Script"] for e in planned]
    # the other job was never held
    assert last_task(state.get_job(group["jobs"][1]["JobId"]))["Conversation"] == group["jobs"][1]["Tasks"][-1][
        "Conversation"]


def test_a_job_that_turns_succeeded_later_holds_its_transcript_from_then():
    state = SimulatorState()
    group = build_job_group("jg", LEADS, task_id=1, seed=2,
                            special_cases={1: ["status:Executing", "transcript_late:600"]})
    state.add_job_group(group)
    job_id = group["jobs"][0]["JobId"]
    state.advance("jg", steps=1, job_ids=[job_id])
    job = state.get_job(job_id)
    assert job["Status"] == "Succeeded" and last_task(job)["Conversation"] == []
    assert state.release_late_transcripts() == 0
    assert state.release_late_transcripts([job_id]) == 1
    assert last_task(state.get_job(job_id))["Conversation"]
