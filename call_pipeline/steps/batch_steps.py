"""The steps each batch goes through once matched (step 2), in order: the one list that the ops
(ops.py builds one op per entry), the catch-up after `.collect()` (steps/catch_up.py) and the
run's "is this batch complete" check read. The graph (jobs.py) wires the same ops; a test checks
that it and this list agree.

A new step: its module (a function `(env, batch) -> StepReport`), its entry here, its op in the
graph; and, when the CRM can tell that a lead still needs it, its `StepWork` in crm/repository.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from call_pipeline import queues
from call_pipeline.domain.counts import StepCounts, StepReport
from call_pipeline.steps.batch import PageBatch
from call_pipeline.steps.call_results import update_call_results
from call_pipeline.steps.env import StepEnv
from call_pipeline.steps.follow_ups import write_follow_ups
from call_pipeline.steps.hot_leads import post_batch_hot_leads
from call_pipeline.steps.recordings import save_recordings

BatchStepFunction = Callable[[StepEnv, PageBatch], StepReport]

# The step every batch step comes after: matching (step 2), whose batch they work on.
MATCHING = "matching"


@dataclass(frozen=True)
class BatchStep:
    name: str  # also the input of `advance_task_state` that collects a last step's results
    run: BatchStepFunction
    after: str  # the step it follows (MATCHING or an earlier entry); steps after the same one run side by side
    op_name: str
    description: str  # the op's, in the UI
    number: int  # the design's step number: its op's `dagster/priority` (later steps first, depth first)
    queue: str  # its op's Celery queue and pool (queues.py)
    resources: tuple[str, ...]  # what its op builds the StepEnv from, beside `crm`
    failed: str  # what failed, in the op's failure ("task 7 page 1: <failed>: ...")
    work: str | None = None  # its `StepWork` in crm/repository.py, when the CRM can tell it is needed
    # The op's line once the step is done, from its counts.
    done: Callable[[StepCounts], str] | None = None
    # What the op does after the step, before a failed unit fails it (never failing it itself);
    # not in the catch-up, after which `advance_task_state` does it for the whole task.
    then: BatchStepFunction | None = None


BATCH_STEPS: tuple[BatchStep, ...] = (
    BatchStep("call_results", update_call_results, after=MATCHING, op_name="fetch_call_results",
              description="Step 3 for the batch's jobs whose status is empty or not terminal.",
              number=3, queue=queues.QUERY_QUEUE, resources=("outboundbot",), failed="call results",
              work="call_results"),
    BatchStep("recordings", save_recordings, after="call_results", op_name="fetch_recordings",
              description="Step 4 for the batch's succeeded calls without a recording (archived, when an "
                          "archive is set); returns once they are saved.",
              number=4, queue=queues.DOWNLOAD_QUEUE, resources=("outboundbot", "recording_archive"),
              failed="recordings", work="recordings",
              done=lambda counts: f"{counts.recordings_fetched} recording(s) saved"),
    BatchStep("follow_ups", write_follow_ups, after="call_results", op_name="create_follow_ups",
              description="Step 5 for the batch's leads with a terminal status and no follow-up; returns "
                          "once they are written.",
              number=5, queue=queues.AI_QUEUE, resources=("dashscope",), failed="follow-ups", work="follow_ups",
              done=lambda counts: f"{counts.follow_ups_written} follow-up(s) written", then=post_batch_hot_leads),
)


def last_steps(steps: tuple[BatchStep, ...] = BATCH_STEPS) -> tuple[BatchStep, ...]:
    """The steps no other step follows: a batch is complete once each of them has a result."""
    followed = {step.after for step in steps}
    return tuple(step for step in steps if step.name not in followed)


def stages(steps: tuple[BatchStep, ...] = BATCH_STEPS) -> list[tuple[BatchStep, ...]]:
    """The steps grouped by the step they follow, in the list's order: each group runs side by
    side, after the groups before it (so after the step it follows)."""
    groups: dict[str, list[BatchStep]] = {}
    for step in steps:
        groups.setdefault(step.after, []).append(step)
    return [tuple(group) for group in groups.values()]


def side_by_side_queues(steps: tuple[BatchStep, ...] = BATCH_STEPS) -> tuple[str, ...]:
    """The queues of the steps that run side by side with another (a stage of several): the
    multiprocess executor caps each, so that one kind of them cannot take every slot."""
    return tuple(dict.fromkeys(step.queue for stage in stages(steps) if len(stage) > 1 for step in stage))


def check_order(steps: tuple[BatchStep, ...] = BATCH_STEPS) -> None:
    """Each step follows matching or a step listed before it, and names are unique."""
    seen = {MATCHING}
    for step in steps:
        if step.after not in seen or step.name in seen:
            raise ValueError(f"batch step {step.name!r}: follows {step.after!r}, which is not listed before it, "
                             "or its name is taken")
        seen.add(step.name)


check_order()
