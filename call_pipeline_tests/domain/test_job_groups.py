from call_pipeline.domain.job_groups import GroupProgress, parse_job_groups_page, tasks_with_late_jobs


def test_parses_each_groups_progress_and_skips_what_it_cannot_read():
    body = {"JobGroups": {"TotalCount": "3", "List": [
        {"JobGroupId": "jg-1", "Progress": {"TotalJobs": 10, "TotalCompleted": "7"}},
        {"JobGroupId": "jg-2", "TotalCallNum": 4, "Progress": None},
        {"JobGroupId": "", "Progress": {"TotalJobs": 1}},
        "not a group",
        {"JobGroupId": "jg-3", "Progress": {"TotalJobs": "many"}},
    ]}}
    groups, total = parse_job_groups_page(body)
    assert total == 3
    assert groups == {"jg-1": GroupProgress(10, 7), "jg-2": GroupProgress(4, 0), "jg-3": GroupProgress(0, 0)}
    assert parse_job_groups_page({}) == ({}, 0)


def test_a_task_has_late_jobs_when_its_group_has_more_jobs_than_it_matched():
    groups = {"jg-1": GroupProgress(10, 10), "jg-2": GroupProgress(5, 5)}
    assert tasks_with_late_jobs(groups, {1: "jg-1", 2: "jg-2", 3: "jg-gone"}, {1: 9, 2: 5}) == {1: 10}


def test_describe_job_group_gives_the_groups_progress_and_its_tag():
    from call_pipeline.domain.job_groups import parse_job_group

    body = {"JobGroup": {"JobGroupId": "jg", "Progress": {"TotalJobs": 120, "TotalCompleted": "84"}}}
    progress = parse_job_group(body)
    assert progress == GroupProgress(120, 84) and progress.tag == "120/84"
    assert parse_job_group({"JobGroup": {"JobGroupId": "jg"}}) == GroupProgress(0, 0)
    assert parse_job_group({}) is None and parse_job_group({"JobGroup": "broken"}) is None


def test_a_groups_status_and_creation_time_are_read_from_both_answers():
    page = {"JobGroups": {"TotalCount": 1, "List": [
        {"JobGroupId": "jg-1", "Status": "Paused", "CreationTime": 1_750_000_000_000, "Progress": {"TotalJobs": 3}}]}}
    (progress,) = parse_job_groups_page(page)[0].values()
    assert progress.status == "Paused" and progress.created_ms == 1_750_000_000_000
    from call_pipeline.domain.job_groups import parse_job_group

    described = parse_job_group({"JobGroup": {"JobGroupId": "jg", "Status": " Draft ", "CreationTime": "oops"}})
    assert described.status == "Draft" and described.created_ms is None
    assert parse_job_group({"JobGroup": {"JobGroupId": "jg"}}).status == ""


# -- which reads cost fewer calls ------------------------------------------------------------------

def test_the_creation_filter_starts_a_minute_before_the_oldest_watched_group():
    from call_pipeline.domain.job_groups import CREATION_FILTER_MARGIN_MS, list_start_time

    created = {"jg-old": 1_000_000, "jg-new": 2_000_000, "jg-unwatched": 10}
    assert list_start_time(created, {"jg-old", "jg-new", "jg-unknown"}) == 1_000_000 - CREATION_FILTER_MARGIN_MS
    assert list_start_time(created, {"jg-unknown"}) is None  # nothing known: an unfiltered listing
    assert list_start_time({"jg": 5}, {"jg"}) == 0


def test_a_page_is_asked_only_when_it_costs_fewer_calls_than_the_describes_it_replaces():
    from call_pipeline.domain.job_groups import next_page_is_cheaper, pages_left

    # before the first page: worth it when it can stand for two describes or more
    assert next_page_is_cheaper(None, missing=100)
    assert next_page_is_cheaper(None, missing=2)
    assert not next_page_is_cheaper(None, missing=1)
    # afterwards: the pages left against the groups still missing
    assert next_page_is_cheaper(3, missing=4)
    assert not next_page_is_cheaper(4, missing=4)  # as many: describes are exact
    assert not next_page_is_cheaper(50, missing=4)
    assert not next_page_is_cheaper(0, missing=4)
    assert pages_left(5_100, 100, 1) == 50 and pages_left(100, 100, 1) == 0 and pages_left(0, 100, 1) == 0


# -- stopped groups ---------------------------------------------------------------------------------

DAY = 86_400


def test_a_group_stopped_longer_than_the_threshold_alerts_once_a_day():
    from call_pipeline.domain.job_groups import StoppedGroup, track_stopped_group

    seen, due = track_stopped_group(None, "Paused", now=1_000.0, threshold_seconds=600)
    assert seen == StoppedGroup("Paused", 1_000.0) and not due  # first seen: since now
    seen, due = track_stopped_group(seen, "Paused", now=1_600.0, threshold_seconds=600)
    assert not due  # exactly the threshold: not longer than it
    seen, due = track_stopped_group(seen, "Paused", now=1_601.0, threshold_seconds=600)
    assert due and seen.since == 1_000.0
    alerted = StoppedGroup(seen.status, seen.since, alerted_at=1_601.0)
    assert not track_stopped_group(alerted, "Paused", now=1_601.0 + DAY - 1, threshold_seconds=600)[1]
    again, due = track_stopped_group(alerted, "Paused", now=1_601.0 + DAY, threshold_seconds=600)
    assert due and again.alerted_at == 1_601.0  # the caller records the new alert


def test_draft_and_initializing_are_stopped_too_and_keep_the_first_time_seen():
    from call_pipeline.domain.job_groups import track_stopped_group

    seen, _ = track_stopped_group(None, "Draft", now=0.0, threshold_seconds=10)
    seen, due = track_stopped_group(seen, "Initializing", now=11.0, threshold_seconds=10)
    assert seen.status == "Initializing" and seen.since == 0.0 and due


def test_a_group_that_moves_again_is_forgotten_and_an_unread_one_is_kept():
    from call_pipeline.domain.job_groups import StoppedGroup, track_stopped_group

    paused = StoppedGroup("Paused", 0.0, alerted_at=5.0)
    for status in ("Executing", "Scheduling", "Completed", "Cancelled", "Failed"):
        assert track_stopped_group(paused, status, now=99.0, threshold_seconds=10) == (None, False)
    assert track_stopped_group(paused, None, now=99.0, threshold_seconds=10) == (paused, False)
    assert track_stopped_group(None, "Executing", now=99.0, threshold_seconds=10) == (None, False)
    # paused again later: counted from then, not from the first pause
    seen, due = track_stopped_group(None, "Paused", now=200.0, threshold_seconds=10)
    assert seen.since == 200.0 and not due


def test_the_next_run_carries_the_unmatched_the_newly_completed_and_the_work_left():
    from call_pipeline.domain.job_groups import jobs_for_the_next_run

    group = GroupProgress(total_jobs=200, total_completed=130)
    # a first sync: every job of the group to match, and the completed ones to carry through
    assert jobs_for_the_next_run(group, None, matched=0, work_left=0) == 200 + 130
    # a live task: all matched, 12 calls ended since the last run, 3 leads with a unit that failed
    assert jobs_for_the_next_run(group, "200/118", matched=200, work_left=3) == 12 + 3
    # the group grew by 50 jobs, none completed since
    assert jobs_for_the_next_run(GroupProgress(250, 130), "200/130", matched=200, work_left=0) == 50
    # nothing new at all
    assert jobs_for_the_next_run(group, "200/130", matched=200, work_left=0) == 0
    # a last run that saw no progress counts every completed job
    assert jobs_for_the_next_run(group, "unknown", matched=200, work_left=0) == 130
    assert jobs_for_the_next_run(None, "200/130", matched=200, work_left=0) is None


def test_the_completed_count_is_read_back_from_a_runs_progress_tag():
    from call_pipeline.domain.job_groups import completed_in_tag

    assert completed_in_tag(GroupProgress(200, 118).tag) == 118
    assert [completed_in_tag(tag) for tag in ("unknown", None, "", "200/", "x/3")] == [None] * 5
