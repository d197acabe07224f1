"""Steps 4 and 5 handed to the shared pools (`steps.RunPageWork`), and the follow-up writer: the
wait after the last page redoes from the CRM whatever this process does not hold, a drained run
does its work inline, and a failed write fails one lead only. No timing assertions."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import datetime

import sqlalchemy as sa

from call_pipeline import steps
from call_pipeline.crm import repository as repo
from call_pipeline.crm.database import get_crm_engine
from call_pipeline.crm.schema import dcc_leads_follow, leads_task_list
from call_pipeline_tests.pipeline_harness import create_task

NOW = datetime(2026, 11, 28, 10, 0, 0)


class NoLlm:
    """The leads below have no transcript: their follow-ups never reach the LLM."""

    def complete(self, messages):  # pragma: no cover - would be a bug
        raise AssertionError("no LLM call expected")


def _task_with_failed_calls(crm_url: str, leads: int) -> tuple[int, list[str]]:
    job_ids = [f"job-{uuid.uuid4().hex[:12]}" for _ in range(leads)]
    task_id = create_task(crm_url, leads=[
        {"leads_id": n + 1, "leads_phone": f"1390000{n:04d}", "call_job_id": job_id, "call_status": "Failed"}
        for n, job_id in enumerate(job_ids)
    ])
    return task_id, job_ids


def _follow_ups(crm_url: str, task_id: int) -> tuple[int, int]:
    """(leads with a follow-up, follow-up rows of the task's leads)"""
    engine = get_crm_engine(crm_url)
    with engine.connect() as conn:
        linked = conn.execute(sa.select(sa.func.count(leads_task_list.c.leads_follow_id))
                              .where(leads_task_list.c.task_id == task_id)).scalar_one()
        lead_ids = sa.select(leads_task_list.c.leads_id).where(leads_task_list.c.task_id == task_id)
        rows = conn.execute(sa.select(sa.func.count()).select_from(dcc_leads_follow)
                            .where(dcc_leads_follow.c.leads_id.in_(lead_ids))).scalar_one()
    return int(linked), int(rows)


def test_the_wait_redoes_pages_it_does_not_hold_and_a_second_wait_writes_nothing(crm_url):
    task_id, job_ids = _task_with_failed_calls(crm_url, 30)
    engine = get_crm_engine(crm_url)
    pages = [job_ids[:10], job_ids[10:20], job_ids[20:]]
    # tickets as a page op of another process (or an earlier run) would have left them
    tickets = [steps.PageTicket(steps.FOLLOW_UPS, task_id, n + 1, tuple(ids), len(ids)) for n, ids in enumerate(pages)]

    def redo_with(work: steps.RunPageWork):
        def redo(ticket: steps.PageTicket) -> None:
            work.queue_follow_ups(engine, NoLlm(), ticket.task_id, ticket.page_number, ticket.job_ids,
                                  lambda: NOW, concurrency=4)
        return redo

    work = steps.RunPageWork(f"test-{uuid.uuid4().hex}")
    report = work.finish(tickets, redo_with(work))
    assert report.failures == []
    assert report.counts["follow_ups_pages_redone"] == 3
    assert report.counts["follow_ups:0"] == 30
    assert _follow_ups(crm_url, task_id) == (30, 30)

    again = steps.RunPageWork(f"test-{uuid.uuid4().hex}")
    report = again.finish(tickets, redo_with(again))
    assert report.failures == [] and report.counts.get("follow_ups:0", 0) == 0
    assert _follow_ups(crm_url, task_id) == (30, 30)


def test_queued_work_is_waited_for_and_a_drained_run_works_inline(crm_url):
    task_id, job_ids = _task_with_failed_calls(crm_url, 20)
    engine = get_crm_engine(crm_url)
    work = steps.RunPageWork(f"test-{uuid.uuid4().hex}")
    first = work.queue_follow_ups(engine, NoLlm(), task_id, 1, job_ids[:10], lambda: NOW, concurrency=4)
    assert first.queued == 10
    work.drain()  # what the failure hook does: wait for what is queued, then work inline
    assert _follow_ups(crm_url, task_id) == (10, 10)
    work.queue_follow_ups(engine, NoLlm(), task_id, 2, job_ids[10:], lambda: NOW, concurrency=4)
    assert _follow_ups(crm_url, task_id) == (20, 20)  # done before queue_follow_ups returned
    report = work.finish([first], lambda ticket: None)
    assert report.failures == [] and report.counts["follow_ups:0"] == 10


def test_a_failed_write_fails_that_lead_only_and_the_writer_goes_on(crm_url, monkeypatch):
    task_id, job_ids = _task_with_failed_calls(crm_url, 12)
    engine = get_crm_engine(crm_url)
    original = repo.create_follow_up_on
    broken_job = job_ids[3]

    def flaky(conn, lead, follow_up, now):
        if lead.call_job_id == broken_job:
            raise sa.exc.OperationalError("INSERT", {}, Exception("server has gone away"))
        return original(conn, lead, follow_up, now)

    original_batch = repo.create_follow_ups_on

    def flaky_batch(conn, items, now):
        if any(lead.call_job_id == broken_job for lead, _ in items):
            raise sa.exc.OperationalError("INSERT", {}, Exception("server has gone away"))
        return original_batch(conn, items, now)

    monkeypatch.setattr(repo, "create_follow_up_on", flaky)
    # a batch holding the broken lead fails whole; the writer then writes its leads one by one
    monkeypatch.setattr(repo, "create_follow_ups_on", flaky_batch)
    work = steps.RunPageWork(f"test-{uuid.uuid4().hex}")
    ticket = work.queue_follow_ups(engine, NoLlm(), task_id, 1, job_ids, lambda: NOW, concurrency=4)
    report = work.finish([ticket], lambda t: None)
    assert len(report.failures) == 1 and broken_job in report.failures[0]
    assert _follow_ups(crm_url, task_id) == (11, 11)

    monkeypatch.setattr(repo, "create_follow_up_on", original)
    monkeypatch.setattr(repo, "create_follow_ups_on", original_batch)
    retry = steps.RunPageWork(f"test-{uuid.uuid4().hex}")
    report = retry.finish([ticket], lambda t: retry.queue_follow_ups(engine, NoLlm(), t.task_id, t.page_number,
                                                                      t.job_ids, lambda: NOW, concurrency=4))
    assert report.failures == [] and report.counts["follow_ups:0"] == 1
    assert _follow_ups(crm_url, task_id) == (12, 12)


EXIT_RIGHT_AFTER_QUEUEING = """
import sys
from datetime import datetime
from call_pipeline import steps
from call_pipeline.crm.database import get_crm_engine
from call_pipeline_tests.test_page_work import NoLlm

crm_url, task_id, job_ids = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
steps.FollowUpWriter.GATHER_SECONDS = 30.0  # nothing would be written before the process ends
work = steps.RunPageWork("exiting-process")
ticket = work.queue_follow_ups(get_crm_engine(crm_url), NoLlm(), task_id, 1, job_ids,
                               lambda: datetime(2026, 11, 28, 10), concurrency=4)
print(ticket.queued)
"""


def test_a_process_that_ends_after_queueing_writes_its_follow_ups_first(crm_url):
    """What a step process of the multiprocess or Celery executor does: its op hands the leads
    to the shared pools and returns, and the process ends. The writer's thread is a daemon; the
    exit handler has it write what it holds."""
    task_id, job_ids = _task_with_failed_calls(crm_url, 15)
    done = subprocess.run([sys.executable, "-c", EXIT_RIGHT_AFTER_QUEUEING, crm_url, str(task_id), ",".join(job_ids)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "15"
    assert _follow_ups(crm_url, task_id) == (15, 15)
