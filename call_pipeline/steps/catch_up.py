"""The batches of a run that no run of its lineage completed, done by the op after `.collect()`.

Dagster re-executes from failure the failed and interrupted steps and what follows them, but not
the mapped steps that never started (a run whose process was killed): their batches would be left
out, their leads marked unmatched and the task concluded. The op after `.collect()` knows every
batch of the run (the fan-out's plan) and which ones came back complete; the others are done here,
with the run's own paging, several batches at once, through the same step functions as the ops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from call_pipeline.domain.counts import StepReport
from call_pipeline.steps.batch import BatchResult, PageBatch, PageRequest
from call_pipeline.steps.batch_steps import BATCH_STEPS, BatchStep, last_steps, stages
from call_pipeline.steps.env import StepEnv
from call_pipeline.steps.matching import match_jobs_of_pages

# Batches caught up at once; each makes its own calls side by side within the shared limits.
BATCHES_AT_ONCE = 2


def incomplete_batches(plan: Sequence[PageRequest], results: Mapping[str, Sequence[BatchResult | None]],
                       steps: tuple[BatchStep, ...] = BATCH_STEPS) -> list[PageRequest]:
    """The planned batches for which a last step (`last_steps`: `results` by step name) has no
    result in this run's lineage."""
    done = [{r.page_number for r in results[step.name] if r is not None} for step in last_steps(steps)]
    return [request for request in plan if any(request.page_number not in pages for pages in done)]


def catch_up_batches(env: StepEnv, requests: Sequence[PageRequest],
                     steps: tuple[BatchStep, ...] = BATCH_STEPS) -> StepReport:
    """Matching, then the batch steps (`steps`, stage by stage, the steps of a stage side by
    side) for each batch in `requests`, doing only what the CRM still needs (every write is
    guarded, so redoing a batch that was partly done is safe)."""

    def one_batch(request: PageRequest) -> StepReport:
        report = StepReport()
        batch = match_jobs_of_pages(env, request)
        report.counts = report.counts + batch.counts
        for stage in stages(steps):
            for stage_report in _side_by_side(env, batch, stage):
                report.merge(stage_report)
        report.counts.batches_caught_up += 1
        return report

    total = StepReport()
    with ThreadPoolExecutor(max_workers=max(1, min(BATCHES_AT_ONCE, len(requests))),
                            thread_name_prefix="call-pipeline-catch-up") as pool:
        for report in pool.map(one_batch, requests):
            total.merge(report)
    return total


def _side_by_side(env: StepEnv, batch: PageBatch, stage: tuple[BatchStep, ...]) -> list[StepReport]:
    if len(stage) == 1:
        return [stage[0].run(env, batch)]
    with ThreadPoolExecutor(max_workers=len(stage), thread_name_prefix="call-pipeline-catch-up") as pool:
        futures = [pool.submit(step.run, env, batch) for step in stage]
        return [future.result() for future in futures]
