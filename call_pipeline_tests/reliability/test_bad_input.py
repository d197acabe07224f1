"""Bad input (contract: "Bad input") either works, or fails only its lead or batch, with a log line (in the
Dagster event log) that says which and why; a rerun changes nothing and duplicates nothing.
The quotes, backslashes and SQL in reference ids, transcripts, statuses and remarks also prove
that every statement is parameterised: they are stored verbatim and no table is touched."""

from __future__ import annotations

import json

import sqlalchemy as sa

from call_pipeline.crm.database import get_crm_engine
from call_pipeline_tests.pipeline_harness import new_reference
from call_pipeline_tests.reliability.harness import event_messages, settle
from call_pipeline_tests.reliability.invariant import Monitor, assert_one_follow_up_per_lead, normalized
from call_pipeline_tests.reliability.scenarios import Scenario
from call_pipeline_tools.simulator.scenarios import build_job_group

TASK_ID = 7100
SQL_REFERENCE = "1'; DROP TABLE leads_task_list; --"
SQL_SCRIPT = 'O\'Brien said \\"); DELETE FROM dcc_leads_follow; -- and C:\\temp\\x \'quoted\' "double"'
SQL_REMARK = '客户说："\'); DROP TABLE dcc_leads_follow; -- 反斜杠\\结尾\\'
ODD_STATUS = "Odd'\"\\;--"
LONG_STATUS = "SucceededAndThenSomeMoreWordsThatDoNotFit"  # 41 characters: the column holds 32
PHONES = {  # lead → (the CRM's spelling, the job's format)
    9: ("138 0013 8009", "plain"), 10: ("138-0013-8010", "plus86"), 11: ("+86 138 0013 8011", "spaced"),
    12: ("0086 13800138012", "86_dashed"), 13: ("86-138-0013-8013", "0086"),
    14: ("139 1111 2222", "plus86_dashed"), 15: ("+86-139-1111-2222", "spaced"),  # one phone, two leads
}
SPECIALS = {
    1: ["no_tasks"], 2: ["tasks_absent"], 3: ["conversation_string"], 4: ["unknown_status"],
    5: ["intent:unclear"], 6: ["times_in_seconds"], 7: ["planed_time_zero"], 8: ["planed_time_absent"],
    16: ["llm:out_of_range"], 17: ["llm:date_words"], 18: ["llm:string_one"], 19: ["llm:fenced"],
    20: ["llm:garbage"], 21: ["llm:past_date"], 22: ["llm:empty_remark"], 23: ["llm:long_remark"],
    24: ["llm:missing_field"], 25: ["intent:interested_price"], 26: ["intent:not_interested_bought"],
    27: ["llm:mark_sql"], 28: ["injection"], 29: ["intent:unclear"],
}
N_LEADS = 32


def bad_input_scenario() -> Scenario:
    leads = []
    for leads_id in range(1, N_LEADS + 1):
        lead = {"leads_id": leads_id, "leads_phone": f"1370000{leads_id:04d}",
                "reference_id": new_reference(TASK_ID, leads_id)}
        if leads_id in PHONES:
            lead.update(leads_phone=PHONES[leads_id][0], reference_id=None)
        if leads_id == 25:
            lead["reference_id"] = SQL_REFERENCE
        leads.append(lead)
    specials = {k: list(v) for k, v in SPECIALS.items()}
    for leads_id, (_, fmt) in PHONES.items():
        specials[leads_id] = ["no_reference", f"phone:{fmt}"]
    group = build_job_group("jg-bad-input", leads, task_id=TASK_ID, seed=5, special_cases=specials,
                            status_mix={"Succeeded": 0.7, "Failed": 0.3})
    jobs = {job["_sim"]["leads_id"]: job for job in group["jobs"]}
    jobs[5]["Status"] = ODD_STATUS
    jobs[26]["Tasks"][-1]["Conversation"].append({"Speaker": "Contact", "Script": SQL_SCRIPT, "Timestamp": 1})
    jobs[29]["Status"] = LONG_STATUS
    return Scenario("bad_input", TASK_ID, "jg-bad-input", leads, group)


def test_bad_input_works_or_fails_only_its_lead(mariadb_url, simulator, instance, env):
    scenario = bad_input_scenario()
    scenario.install(mariadb_url, simulator)
    jobs = scenario.jobs_by_lead
    simulator.state.inject_fault(action="dashscope", times=None, match_text="[[llm:mark_sql]]", llm_content=json.dumps(
        {"leads_remark": SQL_REMARK, "is_interested": 1, "next_follow_time": None}, ensure_ascii=False))

    with Monitor(mariadb_url, [TASK_ID]):
        settled = settle(instance, mariadb_url, TASK_ID)
    state = normalized(mariadb_url, TASK_ID)
    leads = state["leads"]
    raw = raw_rows(mariadb_url)
    messages = event_messages(instance, settled.run_ids[:1])

    def logged(leads_id: int, *words: str) -> None:
        job = jobs[leads_id]
        assert any(job in m and all(w in m for w in words) for m in messages), (leads_id, words)

    # every job found its lead: references (one full of SQL), phones in any format, duplicates 1:1
    assert all(leads[lid]["call_job_id"] == job for lid, job in jobs.items())
    assert raw[25]["reference_id"] == SQL_REFERENCE
    # jobs without tasks: a status, no attempt, the basic follow-up; and a line saying so
    for lid in (1, 2):
        assert leads[lid]["call_task_id"] is None and leads[lid]["follow_up"] == "basic:外呼已完成，但暂无通话内容；"
        logged(lid, "no call attempts")
    # a conversation that is not a list: not stored, the basic follow-up, a line saying so
    assert leads[3]["call_conversation"] is None and leads[3]["follow_up"] == "basic:外呼已完成，但暂无通话内容；"
    logged(3, "conversation is a str, not a list")
    # unknown statuses, quotes and all: stored verbatim, not terminal, no follow-up, queried again
    assert leads[4]["call_status"] == "Archived" and leads[4]["follow_up"] is None
    assert leads[5]["call_status"] == ODD_STATUS and leads[5]["follow_up"] is None
    logged(4, "unknown job status 'Archived'")
    # a status the CRM column cannot hold fails only that lead, with a line saying why
    assert leads[29]["call_status"] is None and leads[29]["follow_up"] is None
    logged(29, "not stored")
    # times in seconds, zero or missing
    assert raw[6]["planed_time"] is not None and raw[6]["planed_time"].year == 2025
    assert raw[7]["planed_time"] is None and raw[8]["planed_time"] is None
    # LLM answers out of range, with a date in words, in the past, empty or too long: the
    # AI-fallback record, with a line naming the job and the reason
    for lid, reason in ((16, "is_interested must be 0, 1 or 2, got 5"), (17, "'明天下午' is not a date-time"),
                        (20, "answer is not JSON"), (21, "is not after the current time"),
                        (22, "leads_remark is empty"), (23, "more than 1000"), (24, "is_interested is missing")):
        assert leads[lid]["follow_up"] == "ai_fallback" and leads[lid]["is_interested"] == 0, lid
        logged(lid, "the model's answer was invalid", reason)
    # "1" is accepted as 1; a fenced answer is accepted
    assert leads[18]["is_interested"] == 1 and leads[18]["follow_up"] == "llm"
    assert leads[19]["follow_up"] == "llm"
    # quotes, backslashes and SQL are data: stored verbatim, and every table is still there
    assert SQL_SCRIPT in [e["Script"] for e in json.loads(raw[26]["call_conversation"])]
    assert remark_of(mariadb_url, 27) == SQL_REMARK and leads[27]["is_interested"] == 1
    # the customer who tells the model to mark them interested is not
    assert leads[28]["is_interested"] == 2
    assert_one_follow_up_per_lead(state)
    with get_crm_engine(mariadb_url).connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM leads_task_list")).scalar() == N_LEADS
        assert conn.execute(sa.text("SELECT COUNT(*) FROM dcc_leads_follow")).scalar() == sum(
            1 for lead in leads.values() if lead["follow_up"])
    # unknown and unstorable statuses keep the task at 2 (their leads are queried again)
    assert state["task_type"] == 2
    assert all(a.success for a in settled.attempts)


def raw_rows(crm_url: str) -> dict[int, dict]:
    with get_crm_engine(crm_url).connect() as conn:
        return {int(r.leads_id): dict(r._mapping) for r in conn.execute(sa.text(
            "SELECT * FROM leads_task_list WHERE task_id = :t"), {"t": TASK_ID})}


def remark_of(crm_url: str, leads_id: int) -> str:
    with get_crm_engine(crm_url).connect() as conn:
        return conn.execute(sa.text(
            "SELECT f.leads_remark FROM dcc_leads_follow f JOIN leads_task_list l ON l.leads_follow_id = f.id "
            "WHERE l.task_id = :t AND l.leads_id = :l"), {"t": TASK_ID, "l": leads_id}).scalar_one()
