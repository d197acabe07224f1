"""How a run covers its task's jobs (contract: "Step 2", "Which jobs a run works on"): whether
it pages the job group at all, how the pages are laid out (from what the cloud answered, not from
the size asked for), whether a page came back whole, and the batches the run maps over.

Plain functions on plain data: the ops and steps call them with an API answer or CRM counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from call_pipeline.domain.matching import ParsedPage

# The first batch is the others' size divided by this (at least one page): its recordings and LLM calls
# start after an eighth of the matching and results work, while the next batch is matched beside
# it and ready before the first one's calls end (measured against a quarter and against none:
# README, Performance).
LEAD_BATCH_DIVISOR = 8


class IncompleteListing(RuntimeError):
    """A ListJobsByGroup page that is not what the run's plan expected (shorter, or of another
    size): some jobs of the group were not listed, so the batch fails instead of going on as if
    the group had no more jobs (its leads would be marked Failed)."""


def group_jobs_of_progress_tag(tag: str | None) -> int | None:
    """The group's job count in a run's progress tag (`"{TotalJobs}/{TotalCompleted}"`); None
    when the tag is absent, "unknown", malformed, or says 0 (an answer without `Progress` counts
    0: a group's size the run cannot rely on)."""
    head = (tag or "").split("/", 1)[0].strip()
    if not head.isdigit():
        return None
    total = int(head)
    return total if total > 0 else None


def needs_paging(group_jobs: int | None, held_jobs: int) -> bool:
    """Whether step 2 must list the group's pages. Not when the group has no more jobs than the
    task's leads hold (distinct `call_job_id`s, written only from this group's listing): then every
    job of the group is some lead's already, and a page could match nothing, neither a new lead
    nor one marked Failed provisionally. A group of unknown size is always paged."""
    if group_jobs is None or group_jobs <= 0:
        return True
    return group_jobs > held_jobs


@dataclass(frozen=True)
class PageLayout:
    """The group's pages as the cloud lays them out: `pages` pages of `page_size` jobs."""

    total_count: int
    page_size: int

    @property
    def pages(self) -> int:
        return (self.total_count + self.page_size - 1) // self.page_size


def page_layout(asked_size: int, first_page: ParsedPage) -> PageLayout:
    """The layout from the answer to page 1 asked with `asked_size`: the `PageSize` the cloud
    echoes (a cloud that caps the size says so here), and, when page 1 lists fewer jobs than
    that while the group has more, the number it listed (a cap it did not echo). Pages planned
    at the size asked would skip the jobs between the cap and that size on every page.
    Raises IncompleteListing when page 1 lists nothing of a group that has jobs."""
    if asked_size < 1:
        raise ValueError(f"page size must be at least 1, got {asked_size}")
    total = first_page.total_count
    size = first_page.page_size if first_page.page_size else asked_size
    if total > 0 and first_page.listed < min(size, total):
        if first_page.listed < 1:
            raise IncompleteListing(f"page 1 lists no job, but TotalCount is {total}")
        size = first_page.listed
    return PageLayout(total, size)


def page_shortfall(number: int, page_size: int, page: ParsedPage) -> str | None:
    """What is wrong with page `number` asked with `page_size`, or None when it is whole: the
    cloud echoed another page size (its offsets are not the plan's), or a page before the last
    (by its own TotalCount: a group that shrank shows it there) listed fewer than `page_size`
    jobs. The last page is not held to a length: how many jobs it has is only TotalCount's word."""
    if page.page_size and page.page_size != page_size:
        return (f"page {number} was asked with PageSize {page_size} and answered with PageSize "
                f"{page.page_size}: its jobs are not the ones the plan expected")
    last = (page.total_count + page_size - 1) // page_size
    if number < last and page.listed < page_size:
        return (f"page {number} lists {page.listed} job(s) of {page_size}, but TotalCount "
                f"{page.total_count} makes it a page before the last")
    return None


def batch_pages(pages: int, pages_per_batch: int) -> list[tuple[int, int]]:
    """(first page, page count) of each batch: a lead batch of `pages_per_batch // 8` pages (at
    least one), then batches of up to `pages_per_batch` consecutive pages."""
    if pages_per_batch < 1:
        raise ValueError(f"pages_per_batch must be at least 1, got {pages_per_batch}")
    lead = min(pages, max(1, pages_per_batch // LEAD_BATCH_DIVISOR))
    if lead < 1:
        return []
    return [(1, lead)] + [(first, min(pages_per_batch, pages - first + 1))
                          for first in range(lead + 1, pages + 1, pages_per_batch)]


def batch_job_ids(job_ids: Sequence[str], page_size: int, pages_per_batch: int) -> list[tuple[str, ...]]:
    """The jobs of a run that lists no pages, in the batches the same jobs would have had as
    pages: a lead batch, then batches of `pages_per_batch` pages of `page_size` jobs. At least
    one batch, empty when no job needs work: the op after `.collect()` runs only when the
    fan-out yielded something (it concludes the task and records the run)."""
    if page_size < 1:
        raise ValueError(f"page size must be at least 1, got {page_size}")
    pages = (len(job_ids) + page_size - 1) // page_size
    batches = [tuple(job_ids[(first - 1) * page_size:(first - 1 + count) * page_size])
               for first, count in batch_pages(pages, pages_per_batch)]
    return batches or [()]
