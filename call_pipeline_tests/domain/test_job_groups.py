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
