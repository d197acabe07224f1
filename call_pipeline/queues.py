"""The Celery queues of the design (seed/design-zh.md), one per kind of step, and the queue of
runs: their one home. Ops carry them as tags and pools, the Celery app declares them, `serve` and
`worker` start workers on them."""

from __future__ import annotations

SYNC_QUEUE = "sync_queue"  # the task check and paging, step 2, the duties after the last batch
QUERY_QUEUE = "query_queue"  # step 3
DOWNLOAD_QUEUE = "download_queue"  # step 4
AI_QUEUE = "ai_queue"  # step 5
STEP_QUEUES = (SYNC_QUEUE, QUERY_QUEUE, DOWNLOAD_QUEUE, AI_QUEUE)
# The CeleryRunLauncher's `default_queue` (deploy/dagster.yaml): runs as Celery tasks.
RUNS_QUEUE = "runs"
WORKER_QUEUES = (*STEP_QUEUES, RUNS_QUEUE)

# The design's priorities (higher runs first), as dagster-celery reads them from op tags.
PRIORITY = {SYNC_QUEUE: 5, QUERY_QUEUE: 6, DOWNLOAD_QUEUE: 3, AI_QUEUE: 4}


def celery_tags(queue: str) -> dict[str, str]:
    """An op's dagster-celery tags for `queue`."""
    return {"dagster-celery/queue": queue, "dagster-celery/priority": str(PRIORITY[queue])}
