"""Contract "Task state": when a call task moves up from calling (2) to calls done (3) to follow-up done (4)."""

from __future__ import annotations

from dataclasses import dataclass

TASK_CREATED, TASK_CALLING, TASK_CALLS_DONE, TASK_FOLLOW_UP_DONE = 1, 2, 3, 4

TASK_TYPE_NAMES = {
    TASK_CREATED: "created",
    TASK_CALLING: "calling",
    TASK_CALLS_DONE: "calls done",
    TASK_FOLLOW_UP_DONE: "follow-up done",
}


@dataclass(frozen=True)
class LeadCounts:
    """Counts over the task's leads that have a call_job_id; the others do not count."""

    with_job: int
    with_terminal_status: int
    with_interest: int


def decide_task_type(current: int, counts: LeadCounts) -> int:
    """The task_type the task should have now; never lower than `current`.

    Both steps are checked in one call so that a task whose calls and follow-ups all finished
    between two evaluations goes 2 → 4 at once. A task at 1 has not started calling, so leads
    appearing under it are not ours to judge; 4 is final.
    """
    task_type = current
    if counts.with_job <= 0:
        return task_type
    if task_type == TASK_CALLING and counts.with_terminal_status == counts.with_job:
        task_type = TASK_CALLS_DONE
    if task_type == TASK_CALLS_DONE and counts.with_interest == counts.with_job:
        task_type = TASK_FOLLOW_UP_DONE
    return task_type
