"""The one list of batch steps (steps/batch_steps.py): the catch-up goes through it, the run's
"is this batch complete" check reads its last steps, the CRM's work-left SQL has an entry per
step, and the graph of `sync_call_task` wires the same ops in the same order."""

from __future__ import annotations

import dataclasses
import threading
from datetime import datetime
from zoneinfo import ZoneInfo

from call_pipeline.crm import repository as repo
from call_pipeline.domain.counts import StepCounts, StepReport
from call_pipeline.steps.batch import BatchResult, PageBatch, PageRequest
from call_pipeline.steps.batch_steps import BATCH_STEPS, MATCHING, BatchStep, last_steps, stages
from call_pipeline.steps.catch_up import catch_up_batches, incomplete_batches
from call_pipeline.steps.env import StepEnv

NOW = datetime(2026, 11, 28, 10, 0)
TASK = repo.TaskRow(7, "task", 2, "jg-7", None)


def recording(steps: tuple[BatchStep, ...]) -> tuple[tuple[BatchStep, ...], list[tuple[str, int]]]:
    """`steps` with each function replaced by one that notes (step name, page) and counts a result."""
    visits: list[tuple[str, int]] = []
    lock = threading.Lock()

    def note(name: str):
        def run(env: StepEnv, batch: PageBatch) -> StepReport:
            with lock:
                visits.append((name, batch.page_number))
            return StepReport(StepCounts(results_stored=1))
        return run

    return tuple(dataclasses.replace(step, run=note(step.name)) for step in steps), visits


def env() -> StepEnv:
    # Batches of jobs drawn from the CRM (`job_ids`) have nothing to match: no engine, no client.
    return StepEnv(engine=None, zone=ZoneInfo("Asia/Shanghai"), clock=lambda: NOW)


def test_catch_up_visits_every_batch_step_of_the_list_in_order():
    steps, visits = recording(BATCH_STEPS)
    report = catch_up_batches(env(), [PageRequest(TASK, 1, 100, 0, job_ids=("j1", "j2"))], steps)
    assert sorted(name for name, _ in visits) == sorted(step.name for step in BATCH_STEPS)
    order = [name for name, _ in visits]
    for step in BATCH_STEPS:  # each step after the one it follows
        if step.after != MATCHING:
            assert order.index(step.after) < order.index(step.name), order
    assert report.counts.results_stored == len(BATCH_STEPS) and report.counts.batches_caught_up == 1
    assert report.counts.batches == 1  # matching's counts, too


def test_a_step_added_to_the_list_is_caught_up_after_the_step_it_follows():
    base = BATCH_STEPS[0]
    steps = (*BATCH_STEPS, dataclasses.replace(base, name="sixth", op_name="sixth_op", after=BATCH_STEPS[-1].name,
                                               work=None))
    steps, visits = recording(steps)
    catch_up_batches(env(), [PageRequest(TASK, 1, 100, 0, job_ids=("j1",)),
                             PageRequest(TASK, 2, 100, 0, job_ids=("j2",))], steps)
    for page in (1, 2):
        order = [name for name, number in visits if number == page]
        assert order[-1] == "sixth" and len(order) == len(steps)
        assert order[0] == BATCH_STEPS[0].name
    last = [step.name for step in last_steps(steps)]
    assert "sixth" in last and BATCH_STEPS[-1].name not in last
    assert stages(steps)[-1] == (steps[-1],)


def test_a_batch_is_complete_once_every_last_step_has_its_result():
    plan = [PageRequest(TASK, n, 100) for n in (1, 2, 3)]
    last = last_steps()
    results = {step.name: [BatchResult(1, StepCounts()), BatchResult(2, StepCounts()), None] for step in last}
    assert [r.page_number for r in incomplete_batches(plan, results)] == [3]
    results[last[-1].name][1] = None  # one last step did not finish batch 2
    assert [r.page_number for r in incomplete_batches(plan, results)] == [2, 3]


def test_every_step_names_its_work_left_sql_and_every_such_sql_has_its_step():
    named = [step.work for step in BATCH_STEPS if step.work is not None]
    assert sorted(named) == sorted(repo.STEP_WORK)


def test_the_graph_wires_the_ops_of_the_list_as_the_list_orders_them():
    from call_pipeline.jobs import sync_call_task
    from call_pipeline.ops import BATCH_OPS

    graph = sync_call_task.graph
    upstream = {node.name: {node_input.input_name: [out.node_name for out in outputs]
                            for node_input, outputs in
                            graph.dependency_structure.input_to_upstream_outputs_for_node(node.name).items()}
                for node in graph.nodes}
    op_of = {MATCHING: "match_job_page", **{step.name: step.op_name for step in BATCH_STEPS}}
    for step in BATCH_STEPS:
        assert BATCH_OPS[step.name].name == step.op_name
        assert upstream[step.op_name] == {"batch": [op_of[step.after]]}, step.name
    followed = {step.after for step in BATCH_STEPS}
    collected = upstream["advance_task_state"]
    assert {name: collected[name] for name in collected if name not in ("task", "plan", "batches")} \
        == {step.name: [step.op_name] for step in last_steps()}
    assert collected["batches"][0] in {op_of[name] for name in followed}
    batch_ops = set(upstream) - {"list_job_pages", "match_job_page", "advance_task_state"}
    assert batch_ops == {step.op_name for step in BATCH_STEPS}


def test_the_multiprocess_executor_caps_the_queues_of_the_steps_that_run_side_by_side():
    from call_pipeline.executors import multiprocess_config

    capped = {limit["value"] for limit in multiprocess_config(4, 2)["tag_concurrency_limits"]}
    assert capped == {step.queue for stage in stages() if len(stage) > 1 for step in stage}
    assert capped == {"download_queue", "ai_queue"}
