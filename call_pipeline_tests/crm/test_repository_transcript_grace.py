"""A transcript that comes late, in SQL: step 3 keeps asking about exactly the leads that
`domain.followups.transcript_pending` says are still waiting, and step 5 leaves exactly those
out; on both CRM back ends."""

from datetime import datetime, timedelta

import sqlalchemy as sa

from call_pipeline.crm import repository as repo
from call_pipeline.crm.database import create_crm_engine
from call_pipeline.crm.schema import call_pipeline_call_ends, leads_task_list
from call_pipeline.domain.call_results import CallResult
from call_pipeline.domain.followups import transcript_pending

NOW = datetime(2026, 11, 28, 10, 0, 0)
GRACE = 300
TRANSCRIPT = '[{"Speaker": "Contact", "Script": "你好"}]'


def result(job_id, status="Succeeded", conversation=None, ended=None) -> CallResult:
    return CallResult(job_id, status, conversation, None, f"t-{job_id}", None, call_ended=ended)


def test_steps_3_and_5_agree_with_the_pure_rule(crm_url):
    engine = create_crm_engine(crm_url)
    jobs = ["recent", "old", "unknown_end", "has_transcript", "failed", "followed", "running", "no_attempt"]
    with engine.begin() as conn:
        conn.execute(leads_task_list.insert(), [{"task_id": 1, "leads_id": i, "call_job_id": job}
                                                for i, job in enumerate(jobs)])
        conn.execute(sa.update(leads_task_list).where(leads_task_list.c.call_job_id == "followed")
                     .values(leads_follow_id=77))
    results = [
        result("recent", ended=NOW - timedelta(seconds=GRACE - 1)),
        result("old", ended=NOW - timedelta(seconds=GRACE)),
        result("unknown_end"),  # no times: its wait starts when step 3 first stores it
        result("has_transcript", conversation=TRANSCRIPT, ended=NOW),
        result("failed", status="Failed", ended=NOW),
        result("followed", ended=NOW),
        result("running", status="Executing"),
        CallResult("no_attempt", "Succeeded", None, None, None, None),  # no call: nothing to wait for
    ]
    with engine.begin() as conn:
        assert repo.store_call_results(conn, 1, results, NOW - timedelta(seconds=10)) == 8
    with engine.connect() as conn:
        ends = dict(conn.execute(sa.select(leads_task_list.c.call_job_id, call_pipeline_call_ends.c.call_ended_time)
                                 .join(call_pipeline_call_ends,
                                       call_pipeline_call_ends.c.lead_row_id == leads_task_list.c.id)).all())
        assert ends == {"recent": NOW - timedelta(seconds=GRACE - 1), "old": NOW - timedelta(seconds=GRACE),
                        "unknown_end": NOW - timedelta(seconds=10)}
        asked = repo.fetch_job_ids_needing_results(conn, 1, now=NOW, transcript_grace_seconds=GRACE)
        follow = {lead.call_job_id: lead
                  for lead in repo.fetch_leads_needing_follow_up(conn, 1, now=NOW, transcript_grace_seconds=GRACE)}
        rows = {r.call_job_id: r for r in conn.execute(sa.select(leads_task_list))}
    pending = {job for job in jobs if rows[job].leads_follow_id is None
               and transcript_pending(rows[job].call_status, rows[job].call_conversation, ends.get(job), NOW, GRACE)}
    assert pending == {"recent", "unknown_end"}
    assert asked == ["recent", "unknown_end", "running"]
    assert set(follow) == {"old", "has_transcript", "failed", "no_attempt"}
    assert follow["old"].call_ended == NOW - timedelta(seconds=GRACE)
    # without a grace, as before: no wait
    with engine.connect() as conn:
        assert repo.fetch_job_ids_needing_results(conn, 1) == ["running"]
        assert {lead.call_job_id for lead in repo.fetch_leads_needing_follow_up(conn, 1)} == {
            "recent", "old", "unknown_end", "has_transcript", "failed", "no_attempt"}


def test_a_late_transcript_is_stored_on_the_succeeded_lead_and_its_end_kept_once(crm_url):
    engine = create_crm_engine(crm_url)
    with engine.begin() as conn:
        conn.execute(leads_task_list.insert(), [{"task_id": 1, "leads_id": 1, "call_job_id": "j"}])
        repo.store_call_results(conn, 1, [result("j", ended=NOW - timedelta(seconds=5))], NOW)
        # read again, still without transcript: its first end is kept (a second insert is no error)
        repo.store_call_results(conn, 1, [result("j", ended=NOW)], NOW)
        assert repo.store_call_results(conn, 1, [result("j", conversation=TRANSCRIPT, ended=NOW)], NOW) == 1
        # a late answer from before the call ended cannot move it back
        assert repo.store_call_results(conn, 1, [result("j", status="Executing")], NOW) == 0
    with engine.connect() as conn:
        row = conn.execute(sa.select(leads_task_list)).one()
        assert (row.call_status, row.call_conversation, row.call_task_id) == ("Succeeded", TRANSCRIPT, "t-j")
        assert conn.execute(sa.select(call_pipeline_call_ends.c.call_ended_time)).scalars().all() == [
            NOW - timedelta(seconds=5)]
