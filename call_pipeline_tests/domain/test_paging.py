"""Whether a run pages its job group, how the pages are laid out from the cloud's answer, when a
page is short, and the batches of a run that lists no pages."""

import pytest

from call_pipeline.domain.matching import ParsedPage, parse_jobs_page
from call_pipeline.domain.paging import (
    IncompleteListing,
    batch_job_ids,
    group_jobs_of_progress_tag,
    needs_paging,
    page_layout,
    page_shortfall,
)


def page(total: int, listed: int, page_size: int | None = None) -> ParsedPage:
    return ParsedPage([], total, page_size=page_size, listed=listed)


def test_the_progress_tag_gives_the_groups_size_or_nothing():
    assert group_jobs_of_progress_tag("2000/1500") == 2000
    for tag in (None, "", "unknown", "x/1", "-3/0", "0/0", "/5"):
        assert group_jobs_of_progress_tag(tag) is None, tag


def test_a_group_whose_jobs_the_leads_all_hold_is_not_paged():
    assert not needs_paging(2000, 2000)
    # leads without a job (provisionally Failed) cannot be matched: the group has no job left
    assert not needs_paging(1998, 1998)
    assert not needs_paging(5, 7)


def test_a_group_that_grew_or_whose_size_is_unknown_is_paged():
    assert needs_paging(2001, 2000)
    assert needs_paging(None, 2000)
    assert needs_paging(0, 2000)  # an answer without Progress counts 0: not a size to rely on
    assert needs_paging(1, 0)


def test_parsing_keeps_the_echoed_page_size_and_the_length_of_the_list():
    body = {"Jobs": {"TotalCount": 130, "PageSize": "50", "List": [{"JobId": "j1"}, {"NoJobId": 1}, "junk"]}}
    parsed = parse_jobs_page(body)
    assert (parsed.page_size, parsed.listed, len(parsed.jobs)) == (50, 3, 1)
    assert parse_jobs_page({"Jobs": {"TotalCount": 1, "List": []}}).page_size is None
    assert parse_jobs_page({"Jobs": {"TotalCount": 1, "PageSize": "many", "List": []}}).page_size is None
    assert parse_jobs_page({"Jobs": {"TotalCount": 1, "PageSize": 0, "List": []}}).page_size is None


def test_pages_are_laid_out_at_the_size_the_cloud_echoes():
    layout = page_layout(100, page(2000, 50, page_size=50))
    assert (layout.page_size, layout.pages) == (50, 40)
    assert page_layout(100, page(2000, 100, page_size=100)).pages == 20
    assert page_layout(100, page(250, 100)).page_size == 100  # no echo: the size asked


def test_a_cap_that_is_not_echoed_shows_in_the_length_of_page_one():
    assert page_layout(100, page(2000, 40, page_size=100)).page_size == 40
    assert page_layout(100, page(2000, 40)).page_size == 40
    # a group smaller than a page is not a cap
    layout = page_layout(100, page(30, 30, page_size=100))
    assert (layout.page_size, layout.pages) == (100, 1)
    assert page_layout(100, page(0, 0, page_size=100)).pages == 0


def test_page_one_empty_while_the_group_has_jobs_cannot_be_laid_out():
    with pytest.raises(IncompleteListing, match="TotalCount is 2000"):
        page_layout(100, page(2000, 0, page_size=100))


def test_a_whole_page_has_no_shortfall():
    assert page_shortfall(1, 100, page(250, 100, 100)) is None
    assert page_shortfall(3, 100, page(250, 50, 100)) is None  # the last page
    assert page_shortfall(4, 100, page(250, 0, 100)) is None  # past the end
    assert page_shortfall(3, 100, page(250, 40, 100)) is None  # the last page: only TotalCount's word
    assert page_shortfall(2, 100, page(120, 20)) is None  # the group shrank: its TotalCount says so
    assert page_shortfall(1, 100, page(250, 100)) is None  # no echo


def test_a_short_page_or_another_page_size_is_a_shortfall():
    assert "lists 50 job(s)" in page_shortfall(2, 100, page(250, 50, 100))
    assert "answered with PageSize 50" in page_shortfall(2, 100, page(250, 50, 50))
    assert "lists 0 job(s)" in page_shortfall(1, 100, page(250, 0))


def test_a_run_without_pages_batches_its_jobs_as_pages_would_be():
    ids = [f"j{i}" for i in range(1, 431)]
    batches = batch_job_ids(ids, 50, 4)
    assert [len(b) for b in batches] == [50, 200, 180]
    assert [job for b in batches for job in b] == ids
    assert batch_job_ids(ids[:7], 100, 20) == [tuple(ids[:7])]


def test_a_run_without_pages_and_without_work_has_one_empty_batch():
    # the op after .collect() runs only when the fan-out yielded a batch
    assert batch_job_ids([], 100, 20) == [()]
