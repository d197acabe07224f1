"""The fan-out: the batches the run maps over, either the job group's pages (laid out as the
cloud answers them) or, when no page can hold a job the task lacks, the task's jobs that still
need work, drawn from the CRM (contract: "Which jobs a run works on")."""

from __future__ import annotations

from collections.abc import Sequence

from call_pipeline.clients.outboundbot import LIST_JOBS_MAX_IDS, OutboundBotClient
from call_pipeline.crm.repository import TaskRow
from call_pipeline.domain.matching import parse_jobs_page
from call_pipeline.domain.paging import LEAD_BATCH_DIVISOR, PageLayout, batch_job_ids, batch_pages, page_layout
from call_pipeline.steps.batch import PageRequest

__all__ = ["LEAD_BATCH_DIVISOR", "batch_pages", "count_job_pages", "job_group_layout", "plan_batches",
           "plan_work_batches"]


def job_group_layout(client: OutboundBotClient, job_group_id: str, page_size: int) -> PageLayout:
    """The group's TotalCount and the page size the cloud uses, from one ListJobsByGroup call."""
    return page_layout(page_size, parse_jobs_page(client.list_jobs_by_group(job_group_id, 1, page_size)))


def count_job_pages(client: OutboundBotClient, job_group_id: str, page_size: int) -> int:
    """Pages of the job group, from one ListJobsByGroup call for its TotalCount."""
    return job_group_layout(client, job_group_id, page_size).pages


def plan_batches(client: OutboundBotClient, task: TaskRow, page_size: int, pages_per_batch: int) -> list[PageRequest]:
    """The group's pages in batches, each page asked at the size the cloud answered page 1 with."""
    layout = job_group_layout(client, task.job_group_id or "", page_size)
    return [PageRequest(task, first, layout.page_size, count)
            for first, count in batch_pages(layout.pages, pages_per_batch)]


def plan_work_batches(task: TaskRow, job_ids: Sequence[str], page_size: int,
                      pages_per_batch: int) -> list[PageRequest]:
    """Batches of the task's matched jobs that still need work, numbered 1, 2, …: no page is
    listed for them (step 2 has nothing to do), steps 3 to 5 work on them as on a page's jobs.
    A "page" of them is `page_size` rounded down to whole ListJobs calls (99 ids), so that a batch
    of jobs still calling makes no call for a handful of ids (pages of 100: 198 + 402 jobs took
    3 + 5 calls where 7 do)."""
    unit = page_size - page_size % LIST_JOBS_MAX_IDS if page_size >= LIST_JOBS_MAX_IDS else page_size
    return [PageRequest(task, number, page_size, 0, job_ids=ids)
            for number, ids in enumerate(batch_job_ids(job_ids, unit, pages_per_batch), start=1)]
