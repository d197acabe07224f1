import json
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from call_pipeline.domain.call_results import (
    NON_TERMINAL_JOB_STATUSES,
    TERMINAL_JOB_STATUSES,
    CallResult,
    ListJobsParse,
    call_ended_at,
    epoch_to_crm_datetime,
    latest_attempt,
    parse_list_jobs_body,
    parse_list_jobs_job,
)

TZ = "Asia/Shanghai"
CONVERSATION = [
    {"Speaker": "Robot", "Script": "您好，这里是XX公司", "Timestamp": 1700000006000, "Summary": []},
    {"Speaker": "Contact", "Script": "你好，有什么事", "Timestamp": 1700000009000},
]


def served_job(**overrides):
    job = {
        "JobId": "job-1",
        "JobGroupId": "jg-1",
        "Status": "Succeeded",
        "ReferenceId": "ref-1",
        "Contacts": [{"ContactId": "c-1", "PhoneNumber": "13800000001", "ReferenceId": "ref-1"}],
        "Summary": [{"SummaryName": "意向", "Content": "有", "Category": ""}],
        "Tasks": [
            {
                "TaskId": "task-0",
                "Status": "NoAnswer",
                "PlanedTime": 1699990000000,
                "CallingNumber": "057100000009",
                "Conversation": [],
            },
            {
                "TaskId": "task-1",
                "JobId": "job-1",
                "Status": "SucceededFinish",
                "PlanedTime": 1700000000000,
                "ActualTime": 1700000005000,
                "CallingNumber": "057100000001",
                "CalledNumber": "13800000001",
                "Conversation": CONVERSATION,
            },
        ],
    }
    job.update(overrides)
    return job


# --- statuses ----------------------------------------------------------------------------------


def test_status_sets():
    assert {"Succeeded", "Failed", "Cancelled"} == TERMINAL_JOB_STATUSES
    assert {"Scheduling", "Executing", "Paused", "Drafted"} == NON_TERMINAL_JOB_STATUSES
    assert not TERMINAL_JOB_STATUSES & NON_TERMINAL_JOB_STATUSES


# --- times -------------------------------------------------------------------------------------


def test_epoch_ms_to_shanghai():
    assert epoch_to_crm_datetime(1700000000000, TZ) == datetime(2023, 11, 15, 6, 13, 20)


def test_result_is_naive():
    assert epoch_to_crm_datetime(1700000000000, ZoneInfo(TZ)).tzinfo is None


@pytest.mark.parametrize(
    "value", [1700000000000, 1700000000, "1700000000000", " 1700000000 ", 1700000000000.0, "1.7e12"]
)
def test_epoch_seconds_milliseconds_and_numeric_strings(value):
    assert epoch_to_crm_datetime(value, TZ) == datetime(2023, 11, 15, 6, 13, 20)


def test_epoch_fraction_of_a_second_is_dropped():
    assert epoch_to_crm_datetime(1700000000999, TZ) == datetime(2023, 11, 15, 6, 13, 20)


def test_other_zone():
    assert epoch_to_crm_datetime(1700000000000, "UTC") == datetime(2023, 11, 14, 22, 13, 20)


@pytest.mark.parametrize(
    "value", [None, 0, "0", -1, -1700000000000, "", "soon", float("nan"), float("inf"), True, [1], 10**30]
)
def test_epoch_garbage_is_none(value):
    assert epoch_to_crm_datetime(value, TZ) is None


# --- one job -------------------------------------------------------------------------------------


def test_parse_served_job_uses_the_latest_task():
    result = parse_list_jobs_job(served_job(), TZ)
    assert result == CallResult(
        job_id="job-1",
        call_status="Succeeded",
        call_conversation=json.dumps(CONVERSATION, ensure_ascii=False),
        planed_time=datetime(2023, 11, 15, 6, 13, 20),
        call_task_id="task-1",
        calling_number="057100000001",
        problems=(),
        call_ended=datetime(2023, 11, 15, 6, 13, 25),
    )
    assert "您好" in result.call_conversation  # UTF-8 text, not \\u escapes
    assert json.loads(result.call_conversation) == CONVERSATION


def test_job_with_no_tasks():
    for tasks in (None, [], "x", {}):
        job = served_job(Tasks=tasks, Status="Failed")
        if tasks is None:
            del job["Tasks"]
        result = parse_list_jobs_job(job, TZ)
        assert result.call_status == "Failed"
        assert (result.call_conversation, result.planed_time, result.call_task_id, result.calling_number) == (
            None,
            None,
            None,
            None,
        )
        assert "job has no call attempts" in result.problems


def test_an_attempt_that_is_not_an_object_is_left_out():
    result = parse_list_jobs_job(served_job(Tasks=[{"TaskId": "t"}, "junk"]), TZ)
    assert result.call_task_id == "t"
    assert any("call attempt #2 is a str, not an object" in p for p in result.problems)
    only_junk = parse_list_jobs_job(served_job(Tasks=["junk", 5]), TZ)
    assert only_junk.call_task_id is None
    assert any("no call attempt that is an object" in p for p in only_junk.problems)


# --- the latest call attempt (the API promises no order) ---------------------------------------


def attempt(task_id, actual=None, planed=None, **extra):
    task = {"TaskId": task_id, "Status": "NoAnswer", "Conversation": [], **extra}
    if actual is not None:
        task["ActualTime"] = actual
    if planed is not None:
        task["PlanedTime"] = planed
    return task


def test_the_latest_actual_time_wins_whatever_the_order():
    answered = attempt("answered", 1700000600000, 1700000590000, Status="SucceededFinish",
                       Conversation=CONVERSATION)
    earlier = attempt("earlier", 1700000005000, 1700000000000)
    for tasks in ([answered, earlier], [earlier, answered]):
        result = parse_list_jobs_job(served_job(Tasks=tasks), TZ)
        assert result.call_task_id == "answered"
        assert json.loads(result.call_conversation) == CONVERSATION
    assert latest_attempt([answered, earlier]) == (0, [])
    assert latest_attempt([earlier, answered]) == (1, [])


def test_planed_time_decides_between_equal_or_missing_actual_times():
    assert latest_attempt([attempt("b", 1700000005000, 1700000003000), attempt("a", 1700000005000, 1700000001000)]
                          ) == (0, [])
    assert latest_attempt([attempt("b", None, 1700000900000), attempt("a", None, 1700000100000)]) == (0, [])
    # an attempt with an ActualTime is later than one without, whatever its PlanedTime
    assert latest_attempt([attempt("done", 1700000005000), attempt("planned", None, 1700009000000)]) == (0, [])
    # zero is no time
    assert latest_attempt([attempt("done", 1700000005000), attempt("zero", 0, 0)]) == (0, [])


def test_no_times_at_all_keeps_the_last_in_the_list():
    assert latest_attempt([attempt("a"), attempt("b"), attempt("c")]) == (2, [])
    assert latest_attempt([attempt("a", "garbage"), attempt("b", 0)]) == (1, [])


def test_seconds_and_milliseconds_compare_as_the_same_moments():
    in_seconds = attempt("later", 1700000600)  # seconds (§7), ten minutes after the other
    in_ms = attempt("earlier", 1700000005000)
    assert latest_attempt([in_seconds, in_ms]) == (0, [])
    assert latest_attempt([in_ms, in_seconds]) == (1, [])


def test_no_attempts():
    assert latest_attempt([]) == (None, ["job has no call attempts"])
    assert latest_attempt(None) == (None, ["job has no call attempts"])


def test_when_the_call_ended():
    zone = ZoneInfo(TZ)
    start = datetime(2023, 11, 15, 6, 13, 25)
    assert call_ended_at({"ActualTime": 1700000005000, "Duration": 35}, zone) == datetime(2023, 11, 15, 6, 14, 0)
    assert call_ended_at({"ActualTime": 1700000005, "Duration": "35"}, zone) == datetime(2023, 11, 15, 6, 14, 0)
    for duration in (None, 0, -3, "x", 10**9):
        assert call_ended_at({"ActualTime": 1700000005000, "Duration": duration}, zone) == start
    assert call_ended_at({"ActualTime": 0, "PlanedTime": 1700000000000}, zone) == datetime(2023, 11, 15, 6, 13, 20)
    assert call_ended_at({}, zone) is None


def test_status_falls_back_to_the_last_task():
    job = served_job(Status=None)
    job["Tasks"][-1]["Status"] = "Executing"
    result = parse_list_jobs_job(job, TZ)
    assert result.call_status == "Executing"
    assert any("latest call attempt" in p for p in result.problems)


def test_no_status_at_all():
    job = served_job(Status="")
    del job["Tasks"][-1]["Status"]
    result = parse_list_jobs_job(job, TZ)
    assert result.call_status is None
    assert "job has no status" in result.problems


def test_unknown_status_is_kept_and_noted():
    result = parse_list_jobs_job(served_job(Status="Exploded"), TZ)
    assert result.call_status == "Exploded"
    assert any("unknown job status 'Exploded'" in p for p in result.problems)


@pytest.mark.parametrize("status", sorted(TERMINAL_JOB_STATUSES | NON_TERMINAL_JOB_STATUSES))
def test_known_statuses_raise_no_problem(status):
    assert parse_list_jobs_job(served_job(Status=status), TZ).problems == ()


@pytest.mark.parametrize("conversation", [None, []])
def test_absent_or_empty_conversation_is_none_without_problem(conversation):
    job = served_job()
    job["Tasks"][-1]["Conversation"] = conversation
    result = parse_list_jobs_job(job, TZ)
    assert result.call_conversation is None
    assert result.problems == ()


@pytest.mark.parametrize("conversation", ["机器人: 你好", {"Speaker": "Robot"}, 5])
def test_conversation_that_is_not_a_list(conversation):
    job = served_job()
    job["Tasks"][-1]["Conversation"] = conversation
    result = parse_list_jobs_job(job, TZ)
    assert result.call_conversation is None
    assert any("not a list" in p for p in result.problems)


@pytest.mark.parametrize(
    ("planed", "expected", "problem"),
    [
        (1700000000, datetime(2023, 11, 15, 6, 13, 20), False),
        ("1700000000000", datetime(2023, 11, 15, 6, 13, 20), False),
        (0, None, False),
        (None, None, False),
        ("tomorrow", None, True),
        (-5, None, True),
    ],
)
def test_planed_time_variants(planed, expected, problem):
    job = served_job()
    job["Tasks"][-1]["PlanedTime"] = planed
    result = parse_list_jobs_job(job, TZ)
    assert result.planed_time == expected
    assert any("PlanedTime" in p for p in result.problems) is problem


def test_task_fields_are_stringified_and_empty_is_none():
    job = served_job()
    job["Tasks"][-1].update({"TaskId": 123, "CallingNumber": ""})
    result = parse_list_jobs_job(job, TZ)
    assert result.call_task_id == "123"
    assert result.calling_number is None


@pytest.mark.parametrize("job_id", [None, "", "  "])
def test_job_without_job_id_raises(job_id):
    with pytest.raises(ValueError, match="JobId"):
        parse_list_jobs_job(served_job(JobId=job_id), TZ)


def test_job_not_a_dict_raises_value_error():
    with pytest.raises(ValueError):
        parse_list_jobs_job("job-1", TZ)


# --- a whole body ------------------------------------------------------------------------------


def test_parse_body_reports_missing_and_failed_jobs():
    body = {
        "Success": True,
        "Jobs": [
            served_job(),
            {"Status": "Failed"},
            served_job(JobId="job-3", Status="Failed", Tasks=[]),
            served_job(JobId="not-asked"),
            served_job(JobId="job-1", Status="Failed"),
        ],
    }
    parsed = parse_list_jobs_body(body, ["job-1", "job-2", "job-3", "job-1"], TZ)
    assert isinstance(parsed, ListJobsParse)
    assert [r.job_id for r in parsed.results] == ["job-1", "job-3"]
    assert parsed.results[0].call_status == "Succeeded"
    assert parsed.missing_job_ids == ["job-2"]
    assert len(parsed.problems) == 3
    assert "job #2" in parsed.problems[0] and "JobId" in parsed.problems[0]
    assert "not-asked" in parsed.problems[1]
    assert "twice" in parsed.problems[2]


@pytest.mark.parametrize("body", [{}, {"Jobs": None}, {"Jobs": {"List": []}}, None])
def test_parse_body_without_jobs_misses_everything(body):
    parsed = parse_list_jobs_body(body, ["a", "b"], TZ)
    assert parsed.results == []
    assert parsed.missing_job_ids == ["a", "b"]
    assert parsed.problems


def test_parse_body_empty_list_is_not_a_problem():
    parsed = parse_list_jobs_body({"Jobs": []}, ["a"], TZ)
    assert parsed.missing_job_ids == ["a"]
    assert parsed.problems == []
