"""The fan-out: how many pages the job group has, and the batches of pages the run maps over."""

from __future__ import annotations

from call_pipeline.clients.outboundbot import OutboundBotClient
from call_pipeline.crm.repository import TaskRow
from call_pipeline.domain.matching import parse_jobs_page
from call_pipeline.steps.batch import PageRequest


def count_job_pages(client: OutboundBotClient, job_group_id: str, page_size: int) -> int:
    """Pages of the job group, from one ListJobsByGroup call for its TotalCount."""
    total = parse_jobs_page(client.list_jobs_by_group(job_group_id, 1, page_size)).total_count
    return (total + page_size - 1) // page_size


# The first batch is this share of the others (at least one page): its recordings and LLM calls
# start after an eighth of the matching and results work, while the next batch is matched beside
# it and ready before the first one's calls end (measured against a quarter and against none:
# README, Performance).
LEAD_BATCH_SHARE = 8


def batch_pages(pages: int, pages_per_batch: int) -> list[tuple[int, int]]:
    """(first page, page count) of each batch: a lead batch of `pages_per_batch // 8` pages (at
    least one), then batches of up to `pages_per_batch` consecutive pages."""
    if pages_per_batch < 1:
        raise ValueError(f"pages_per_batch must be at least 1, got {pages_per_batch}")
    lead = min(pages, max(1, pages_per_batch // LEAD_BATCH_SHARE))
    if lead < 1:
        return []
    return [(1, lead)] + [(first, min(pages_per_batch, pages - first + 1))
                          for first in range(lead + 1, pages + 1, pages_per_batch)]


def plan_batches(client: OutboundBotClient, task: TaskRow, page_size: int, pages_per_batch: int) -> list[PageRequest]:
    pages = count_job_pages(client, task.job_group_id or "", page_size)
    return [PageRequest(task, first, page_size, count) for first, count in batch_pages(pages, pages_per_batch)]
