"""The progress of job groups, from ListJobGroups and DescribeJobGroup answers: how many jobs each
group has and how many are done, to tell cheaply which tasks have new work."""

from __future__ import annotations

from dataclasses import dataclass

from call_pipeline.domain._values import clean_text


@dataclass(frozen=True)
class GroupProgress:
    total_jobs: int
    total_completed: int

    @property
    def tag(self) -> str:
        """How a run records the progress it saw (the sensor compares it with the group's now)."""
        return f"{self.total_jobs}/{self.total_completed}"


def _progress_of(row: dict) -> GroupProgress:
    p = row.get("Progress") if isinstance(row.get("Progress"), dict) else {}
    return GroupProgress(_count(p.get("TotalJobs", row.get("TotalCallNum"))), _count(p.get("TotalCompleted")))


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
