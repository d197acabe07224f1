"""The CRM work of a run is bulk: a few statements per page of jobs and per batch of
follow-ups, never a statement per lead. Counted on MariaDB through SQLAlchemy's cursor events
while `sync_call_task` runs against the simulator through the real SDKs."""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from call_pipeline.crm.database import get_crm_engine
from call_pipeline.crm.schema import leads_task_list
from call_pipeline_tests.pipeline_harness import (
    create_task,
    new_reference,
    project_instance_for_test,
    run_sync,
    snapshot,
)
from call_pipeline_tools.simulator.scenarios import build_job_group_from_crm

LEADS = 250
PAGING = {"page_size": 50, "pages_per_batch": 2}  # five pages in three batches: a lead page, then 2 + 2
BATCHES = 3


@pytest.fixture
def instance():
    with project_instance_for_test() as instance:
        yield instance


def repository_caller() -> str:
    """The `call_pipeline.crm.repository` function on the stack (called from an SQLAlchemy
    event handler, itself called by SQLAlchemy)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__") == "call_pipeline.crm.repository":
            return frame.f_code.co_name
        frame = frame.f_back
    return "(elsewhere)"


@contextlib.contextmanager
def statements_by_function(engine: sa.Engine) -> Iterator[tuple[Counter, Counter]]:
    by_function: Counter = Counter()
    by_kind: Counter = Counter()

    def count(conn, cursor, statement, parameters, context, executemany):
        by_function[repository_caller()] += 1
        by_kind[statement.lstrip().split(None, 1)[0].upper()] += 1

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        yield by_function, by_kind
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)


def test_a_runs_database_work_is_a_few_statements_per_page(mariadb_url, simulator, instance):
    task_id = create_task(mariadb_url, job_group_id="jg-bulk", leads=[])
    engine = get_crm_engine(mariadb_url)
    with engine.begin() as conn:
        conn.execute(leads_task_list.insert(), [
            {"task_id": task_id, "leads_id": i, "leads_phone": f"1380000{i:04d}",
             "reference_id": new_reference(task_id, i)} for i in range(1, LEADS + 1)])
    simulator.state.add_job_group(build_job_group_from_crm(
        mariadb_url, task_id, seed=5, status_mix={"Succeeded": 0.6, "Failed": 0.3, "Cancelled": 0.1}))

    with statements_by_function(engine) as (by_function, by_kind):
        result = run_sync(mariadb_url, simulator, task_id, instance, paging=PAGING)
    assert result.success
    mapped = {e.step_key for e in result.all_events if e.is_step_success and e.step_key.startswith("match_job_page")}
    assert mapped == {"match_job_page[page_1]", "match_job_page[pages_2_3]", "match_job_page[pages_4_5]"}

    crm = snapshot(mariadb_url, task_id)
    assert crm.task_type == 4
    assert len(crm.follow_ups) == LEADS
    assert all(lead["call_job_id"] and lead["leads_follow_id"] for lead in crm.leads.values())
    # per batch of pages: one read (two when some job needs phone matching) and one write for
    # matching, one read and one write for call results (all its ListJobs answers together), one
    # read and one write for recordings, one read for follow-ups
    assert by_function["fetch_leads_for_matching"] <= 2 * BATCHES
    assert by_function["assign_jobs_to_leads"] == BATCHES
    assert by_function["fetch_job_ids_needing_results"] == BATCHES
    assert by_function["store_call_results"] == BATCHES
    assert by_function["fetch_leads_needing_recording"] == BATCHES
    assert by_function["store_recording_urls"] == BATCHES
    assert by_function["fetch_leads_needing_follow_up"] == BATCHES
    # follow-ups are gathered into a few transactions: an INSERT and an UPDATE per batch
    assert 1 <= by_function["create_follow_ups_on"] <= LEADS // 10, by_function
    assert by_function["create_follow_up_on"] == 0, by_function
    total = sum(by_kind[k] for k in ("SELECT", "INSERT", "UPDATE", "DELETE"))
    assert total < LEADS // 2, (by_kind, by_function)
