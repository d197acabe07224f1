"""The progress of job groups, from ListJobGroups and DescribeJobGroup answers: how many jobs each
group has and how many are done, to tell cheaply which tasks have new work."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from call_pipeline.domain._values import clean_text


@dataclass(frozen=True)
class GroupProgress:
    total_jobs: int
    total_completed: int
    # The group's own Status (Draft, Scheduling, Executing, Paused, Completed, Failed, Cancelled,
    # Initializing); "" when the answer had none.
    status: str = ""
    # CreationTime (ms), what a ListJobGroups time filter compares; None when the answer had none.
    created_ms: int | None = field(default=None, compare=False)

    @property
    def tag(self) -> str:
        """How a run records the progress it saw (the sensor compares it with the group's now)."""
        return f"{self.total_jobs}/{self.total_completed}"


def _progress_of(row: dict) -> GroupProgress:
    p = row.get("Progress") if isinstance(row.get("Progress"), dict) else {}
    created = _count(row.get("CreationTime"))
    return GroupProgress(_count(p.get("TotalJobs", row.get("TotalCallNum"))), _count(p.get("TotalCompleted")),
                         clean_text(row.get("Status")) or "", created or None)


def _count(raw: object) -> int:
    text = clean_text(raw)
    try:
        return max(int(float(text)), 0) if text is not None else 0
    except ValueError:
        return 0


def parse_job_groups_page(body: dict) -> tuple[dict[str, GroupProgress], int]:
    """({job group id: progress}, TotalCount) of one ListJobGroups page. A group without an id
    is left out; counters that are not numbers count as 0."""
    groups = (body or {}).get("JobGroups") or {}
    progress = {}
    for row in groups.get("List") or []:
        if not isinstance(row, dict):
            continue
        group_id = clean_text(row.get("JobGroupId"))
        if not group_id:
            continue
        progress[group_id] = _progress_of(row)
    return progress, _count(groups.get("TotalCount"))


def parse_job_group(body: dict) -> GroupProgress | None:
    """The progress in a DescribeJobGroup answer; None when it has no job group."""
    group = (body or {}).get("JobGroup")
    return _progress_of(group) if isinstance(group, dict) else None


def tasks_with_late_jobs(groups: dict[str, GroupProgress], tasks: dict[int, str],
                         matched: dict[int, int]) -> dict[int, int]:
    """{task id: its group's TotalJobs} for the tasks whose group has more jobs than the task has
    matched leads (a job that came after the task was concluded)."""
    late = {}
    for task_id, group_id in tasks.items():
        progress = groups.get(group_id)
        if progress is not None and progress.total_jobs > matched.get(task_id, 0):
            late[task_id] = progress.total_jobs
    return late


def completed_in_tag(tag: str | None) -> int | None:
    """TotalCompleted as a run's progress tag (`GroupProgress.tag`) recorded it; None when the tag
    holds no progress ("unknown", missing)."""
    total, _, completed = (tag or "").partition("/")
    return int(completed) if total.isdigit() and completed.isdigit() else None


def jobs_for_the_next_run(progress: GroupProgress | None, last_progress_tag: str | None, matched: int,
                          work_left: int) -> int | None:
    """How much work the next run of a task is expected to carry, in jobs: the group's jobs that
    no lead holds yet (to list and match), the jobs completed since the task's last completed run
    saw the group (their results, recordings and follow-ups), and the leads the CRM holds work for
    (a job of a first sync counts once to match and once more when it has completed). None when
    the group's progress is unknown: the run may have anything to do."""
    if progress is None:
        return None
    unmatched = max(progress.total_jobs - matched, 0)
    completed_before = completed_in_tag(last_progress_tag) or 0
    return unmatched + max(progress.total_completed - completed_before, 0) + work_left


# Reading the watched groups. ListJobGroups pages over every group the instance ever had unless
# it is filtered; its creation-time filter (StartTime, ms) keeps only groups created since the
# oldest watched one. DescribeJobGroup reads one group. A tick asks for whichever costs fewer calls.

# The StartTime asked for is this much before the oldest watched group's CreationTime, so that a
# bound the cloud applies exclusively, or a clock that differs by a little, still keeps that group.
CREATION_FILTER_MARGIN_MS = 60_000


def list_start_time(created_ms: dict[str, int], watched: set[str]) -> int | None:
    """The StartTime of a ListJobGroups call that returns every watched group whose CreationTime
    is known; None when none is known (the listing is then unfiltered: the first tick of a new
    sensor, which learns the creation times from it)."""
    known = [created_ms[g] for g in watched if g in created_ms]
    return max(min(known) - CREATION_FILTER_MARGIN_MS, 0) if known else None


def next_page_is_cheaper(pages_left: int | None, missing: int) -> bool:
    """Whether the next ListJobGroups page costs fewer calls than one DescribeJobGroup per watched
    group still missing. `pages_left` is None before the first page (its TotalCount unknown yet):
    asking it pays off when it can stand for two describes or more. Afterwards, the pages left
    against the groups still missing. So a tick costs at most one call more than a describe per
    watched group, and no more than the listing when that is cheaper."""
    if pages_left is None:
        return missing >= 2
    return 0 < pages_left < missing


def pages_left(total_count: int, page_size: int, pages_read: int) -> int:
    """Pages of a listing of `total_count` groups not read yet."""
    return max(math.ceil(total_count / page_size) - pages_read, 0) if page_size > 0 else 0


# Stopped groups (SPEC §12). A group in one of these is not calling, and nothing the pipeline does
# makes it call again: someone must resume, start or fix it in the cloud.
STOPPED_GROUP_STATUSES = frozenset({"Paused", "Draft", "Initializing"})
STALLED_ALERT_EVERY_SECONDS = 86_400  # at most one alert a day per task


@dataclass(frozen=True)
class StoppedGroup:
    """What the pipeline remembers of a task whose group it saw stopped: the status, since when
    (the first tick that saw it stopped, epoch seconds) and the last alert's time."""
    status: str
    since: float
    alerted_at: float | None = None


def track_stopped_group(previous: StoppedGroup | None, status: str | None, now: float,
                        threshold_seconds: float) -> tuple[StoppedGroup | None, bool]:
    """(what to remember of the task's group now, whether to alert now).

    A status not read this tick (None: the call failed, the group is gone) changes nothing. A group
    that moves again (any status outside STOPPED_GROUP_STATUSES) is forgotten. A stopped group
    keeps the time it was first seen stopped, also when it goes from one stopped status to another
    (Draft to Paused), and alerts once it has been stopped for longer than `threshold_seconds`,
    then again at most once a day while it stays stopped."""
    if status is None:
        return previous, False
    if status not in STOPPED_GROUP_STATUSES:
        return None, False
    if previous is None:
        previous = StoppedGroup(status, now)
    stopped = StoppedGroup(status, previous.since, previous.alerted_at)
    due = now - stopped.since > threshold_seconds and (
        stopped.alerted_at is None or now - stopped.alerted_at >= STALLED_ALERT_EVERY_SECONDS)
    return stopped, due
