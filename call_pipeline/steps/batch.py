"""What the ops of one run hand each other: a batch of pages, and each step's counts for it.
No customer data in them: they are pickled into storage that other processes and machines read."""

from __future__ import annotations

from dataclasses import dataclass, field

from call_pipeline.crm.repository import TaskRow
from call_pipeline.domain.counts import StepCounts


@dataclass(frozen=True)
class PageRequest:
    """A batch of `page_count` consecutive pages of the task's job group, from `page_number`."""

    task: TaskRow
    page_number: int
    page_size: int
    page_count: int = 1

    @property
    def label(self) -> str:
        return batch_label(self.page_number, self.page_count)

    @property
    def mapping_key(self) -> str:
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
        return batch_label(self.page_number, self.page_count)


@dataclass(frozen=True)
class BatchResult:
    """What step 4 or step 5 did for one batch."""

    page_number: int
    counts: StepCounts


def batch_label(page_number: int, page_count: int) -> str:
    last = page_number + page_count - 1
    return f"page {page_number}" if last == page_number else f"pages {page_number}-{last}"
