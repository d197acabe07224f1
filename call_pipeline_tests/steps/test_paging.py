"""The batches a run maps over."""

import pytest

from call_pipeline.steps.paging import batch_pages


def covered(batches: list[tuple[int, int]]) -> list[int]:
    return [page for first, count in batches for page in range(first, first + count)]


def test_an_eighth_sized_lead_batch_then_full_ones():
    assert batch_pages(100, 20) == [(1, 2), (3, 20), (23, 20), (43, 20), (63, 20), (83, 18)]
    assert batch_pages(20, 20) == [(1, 2), (3, 18)]
    assert batch_pages(100, 40) == [(1, 5), (6, 40), (46, 40), (86, 15)]
    assert batch_pages(7, 10) == [(1, 1), (2, 6)]


def test_small_batches_lead_with_one_page():
    assert batch_pages(5, 2) == [(1, 1), (2, 2), (4, 2)]
    assert batch_pages(3, 1) == [(1, 1), (2, 1), (3, 1)]


def test_fewer_pages_than_the_lead_batch():
    assert batch_pages(3, 40) == [(1, 3)]
    assert batch_pages(1, 20) == [(1, 1)]
    assert batch_pages(0, 20) == []


@pytest.mark.parametrize("pages", [1, 2, 5, 6, 19, 20, 21, 99, 100, 101, 1000])
@pytest.mark.parametrize("per_batch", [1, 2, 3, 4, 10, 20, 50])
def test_every_page_in_exactly_one_batch_in_order(pages, per_batch):
    batches = batch_pages(pages, per_batch)
    assert covered(batches) == list(range(1, pages + 1))
    assert all(1 <= count <= per_batch for _, count in batches)


def test_a_batch_has_at_least_one_page():
    with pytest.raises(ValueError, match="at least 1"):
        batch_pages(10, 0)


def test_a_run_without_pages_batches_its_jobs_in_whole_list_jobs_calls():
    from call_pipeline.crm.repository import TaskRow
    from call_pipeline.steps.paging import plan_work_batches

    task = TaskRow(1, "t", 2, "jg-1", 9)
    ids = [f"j{i}" for i in range(600)]
    plan = plan_work_batches(task, ids, 100, 20)
    assert [len(request.job_ids) for request in plan] == [198, 402]  # 2 + 5 ListJobs calls, not 3 + 5
    assert [request.mapping_key for request in plan] == ["jobs_1", "jobs_2"]
    assert all(request.page_count == 0 for request in plan)
    assert [len(request.job_ids) for request in plan_work_batches(task, ids[:90], 50, 2)] == [50, 40]
    assert [request.job_ids for request in plan_work_batches(task, [], 100, 20)] == [()]
