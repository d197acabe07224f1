"""After the last batch: leads that matched no job, and the task's state."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Engine

from call_pipeline.crm import repository as repo
from call_pipeline.domain.task_state import TASK_CALLING, TASK_CALLS_DONE, TASK_FOLLOW_UP_DONE, decide_task_type


def fail_unmatched_leads(engine: Engine, task_id: int, now: datetime) -> tuple[int, tuple[int, list[int]]]:
    """Leads that should have a job and have none are marked Failed (provisionally: a later run
    that matches them clears it). Returns how many, and the leads left as they are because they
    have nothing to match a job by (no reference id, no phone): how many and the first ids."""
    with repo.write_transaction(engine) as conn:
        marked = repo.mark_unmatched_leads_failed(conn, task_id, now)
        return marked, repo.fetch_leads_without_identity(conn, task_id)


def evaluate_task_state(engine: Engine, task_id: int, now: datetime) -> tuple[int | None, int | None]:
    """Moves the task up as far as its leads allow (2 → 3 → 4 possibly at once), each move
    guarded in SQL. Returns the task's type before and after; (None, None) when there is no task."""
    with repo.write_transaction(engine) as conn:
        task = repo.fetch_task(conn, task_id)
        if task is None:
            return None, None
        before = task.task_type
        target = decide_task_type(before, repo.count_task_leads(conn, task_id))
        current = before
        if current == TASK_CALLING and target >= TASK_CALLS_DONE and repo.advance_task_type(
            conn, task_id, TASK_CALLING, TASK_CALLS_DONE, now
        ):
            current = TASK_CALLS_DONE
        if current == TASK_CALLS_DONE and target >= TASK_FOLLOW_UP_DONE and repo.advance_task_type(
            conn, task_id, TASK_CALLS_DONE, TASK_FOLLOW_UP_DONE, now
        ):
            current = TASK_FOLLOW_UP_DONE
    return before, current
