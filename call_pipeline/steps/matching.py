"""Step 2 for a batch of pages: map its jobs to leads, with one read and one bulk write."""

from __future__ import annotations

from call_pipeline.crm import repository as repo
from call_pipeline.domain.counts import MASKED_PHONE_EXAMPLES, StepCounts
from call_pipeline.domain.matching import legacy_leads_ids, match_jobs_to_leads, parse_jobs_page
from call_pipeline.domain.paging import IncompleteListing, page_shortfall
from call_pipeline.steps._concurrent import call_and_write
from call_pipeline.steps.batch import PageBatch, PageRequest
from call_pipeline.steps.env import StepEnv

# ListJobsByGroup calls of a batch in flight at once (the shared rate limit still bounds them):
# one after the other, a batch of 10 pages waited for 10 round trips before it could be matched.
PAGES_IN_FLIGHT = 4


def match_jobs_of_pages(env: StepEnv, request: PageRequest) -> PageBatch:
    """One ListJobsByGroup call per page, a few at once (a failed call fails the batch: the op
    retries it), then one read of the leads the batch's jobs can concern and one bulk write.
    A page that is not whole (contract: "Pages are what the cloud sent") fails the batch with
    IncompleteListing, before anything is written: the run must not conclude on a partial listing.
    A batch of jobs drawn from the CRM (`request.job_ids`: a run that lists no pages) has nothing
    to match; its jobs go on to the batch steps (steps/batch_steps.py)."""
    engine, client, now, logger = env.engine, env.outboundbot, env.clock(), env.logger
    task = request.task
    if request.job_ids is not None:
        return PageBatch(task.id, request.page_number, request.job_ids, StepCounts(batches=1), 0)
    pages = {}

    def fetch(number: int):
        return number, parse_jobs_page(client.list_jobs_by_group(task.job_group_id or "", number, request.page_size))

    call_and_write(range(request.page_number, request.page_number + request.page_count), fetch, pages.update,
                   threads=PAGES_IN_FLIGHT, batch_size=request.page_count, max_wait_s=0.0,
                   name="call-pipeline-pages", stop=env.stop)
    shortfalls = [problem for number in sorted(pages)
                  if (problem := page_shortfall(number, request.page_size, pages[number]))]
    if shortfalls:
        raise IncompleteListing(f"task {task.id} {request.label}: the job group's listing is incomplete, "
                                f"nothing of this batch is matched (tried again by the op's retry and the "
                                f"next run): {'; '.join(shortfalls)}")
    jobs = []
    for number in sorted(pages):  # matched in the group's order, whichever page came first
        for problem in pages[number].problems:
            logger.warning("task %s page %s: %s", task.id, number, problem)
        jobs.extend(pages[number].jobs)
    job_ids = [job.job_id for job in jobs]
    reference_ids = [ref for job in jobs for ref in job.reference_ids if ref]
    legacy_ids = legacy_leads_ids(task.id, reference_ids)
    with repo.write_transaction(engine) as conn:
        # First only the leads that the jobs' reference ids name (and those already holding one of
        # the jobs); the task's free leads (for phone matching) are read only when some job found
        # no lead that way.
        leads = repo.fetch_leads_for_matching(conn, task.id, reference_ids, legacy_ids, free_leads=False,
                                              job_ids=job_ids)
        result = match_jobs_to_leads(jobs, leads, task.id)
        if result.unmatched_job_ids:
            leads = repo.fetch_leads_for_matching(conn, task.id, reference_ids, legacy_ids, job_ids=job_ids)
            result = match_jobs_to_leads(jobs, leads, task.id)
        written = repo.assign_jobs_to_leads(conn, task.id, result.matches, now)
    for conflict in result.conflicts:
        logger.warning("task %s %s: %s", task.id, request.label, conflict)
    counts = StepCounts(jobs_listed=len(job_ids), already_matched=len(result.already_matched_job_ids),
                        unmatched_jobs=len(result.unmatched_job_ids),
                        lost_to_concurrent_run=len(result.matches) - written,
                        batches=1, pages=request.page_count,
                        masked_phone_jobs=len(result.masked_phone_job_ids),
                        masked_phone_examples=tuple(result.masked_phone_job_ids[:MASKED_PHONE_EXAMPLES]))
    counts.matched_by.update(match.strategy for match in result.matches)
    if counts.lost_to_concurrent_run:
        logger.warning("task %s %s: %d lead(s) got a job from another run meanwhile; their jobs "
                       "are matched again on the next run", task.id, request.label, counts.lost_to_concurrent_run)
    return PageBatch(task.id, request.page_number, tuple(job_ids), counts, request.page_count)
