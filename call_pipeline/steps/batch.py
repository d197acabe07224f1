"""What the ops of one run hand each other: a batch of pages, and each step's counts for it.
No customer data in them: they are pickled into storage that other processes and machines read."""

from __future__ import annotations

from dataclasses import dataclass, field

from call_pipeline.crm.repository import TaskRow
from call_pipeline.domain.counts import StepCounts


@dataclass(frozen=True)
class PageRequest:
    """A batch of `page_count` consecutive pages of the task's job group, from `page_number`;
    or, with `job_ids`, batch number `page_number` of the task's matched jobs that still need work
    (a run that lists no pages: `page_count` 0)."""

    task: TaskRow
    page_number: int
    page_size: int
    page_count: int = 1
    job_ids: tuple[str, ...] | None = None

    @property
    def label(self) -> str:
        if self.job_ids is not None:
            return f"jobs batch {self.page_number}"
        return batch_label(self.page_number, self.page_count)

    @property
    def mapping_key(self) -> str:
        if self.job_ids is not None:
            return f"jobs_{self.page_number}"
        last = self.page_number + self.page_count - 1
        return f"page_{self.page_number}" if self.page_count == 1 else f"pages_{self.page_number}_{last}"


@dataclass(frozen=True)
class PageBatch:
    """The jobs of a batch of pages, once matched: what steps 3 to 5 work on."""

    task_id: int
    page_number: int
    job_ids: tuple[str, ...]
    counts: StepCounts = field(default_factory=StepCounts)
    page_count: int = 1

    @property
    def label(self) -> str:
        if self.page_count == 0:
            return f"jobs batch {self.page_number}"
        return batch_label(self.page_number, self.page_count)


@dataclass(frozen=True)
class BatchResult:
    """What step 4 or step 5 did for one batch."""

    page_number: int
    counts: StepCounts


def batch_label(page_number: int, page_count: int) -> str:
    last = page_number + page_count - 1
    return f"page {page_number}" if last == page_number else f"pages {page_number}-{last}"
