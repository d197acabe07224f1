import pytest

from call_pipeline.domain.task_state import (
    TASK_CALLING,
    TASK_CALLS_DONE,
    TASK_CREATED,
    TASK_FOLLOW_UP_DONE,
    LeadCounts,
    decide_task_type,
)


def test_constants():
    assert (TASK_CREATED, TASK_CALLING, TASK_CALLS_DONE, TASK_FOLLOW_UP_DONE) == (1, 2, 3, 4)


def test_calling_to_calls_done_when_every_lead_with_a_job_has_a_terminal_status():
    assert decide_task_type(2, LeadCounts(with_job=5, with_terminal_status=5, with_interest=2)) == 3


def test_calling_stays_while_some_lead_is_not_terminal():
    assert decide_task_type(2, LeadCounts(with_job=5, with_terminal_status=4, with_interest=4)) == 2


def test_calling_to_follow_up_done_in_one_evaluation():
    assert decide_task_type(2, LeadCounts(with_job=5, with_terminal_status=5, with_interest=5)) == 4


def test_calls_done_to_follow_up_done():
    assert decide_task_type(3, LeadCounts(with_job=5, with_terminal_status=5, with_interest=5)) == 4


def test_calls_done_stays_while_follow_ups_are_missing():
    assert decide_task_type(3, LeadCounts(with_job=5, with_terminal_status=5, with_interest=4)) == 3


@pytest.mark.parametrize("current", [2, 3])
def test_no_lead_with_a_job_changes_nothing(current):
    assert decide_task_type(current, LeadCounts(0, 0, 0)) == current


@pytest.mark.parametrize(
    "counts",
    [LeadCounts(5, 0, 0), LeadCounts(5, 5, 0), LeadCounts(0, 0, 0), LeadCounts(5, 5, 5)],
)
def test_never_goes_down(counts):
    assert decide_task_type(4, counts) == 4
    assert decide_task_type(3, counts) >= 3


@pytest.mark.parametrize("current", [1, 4, 0, 7])
def test_created_follow_up_done_and_unknown_types_are_left_alone(current):
    assert decide_task_type(current, LeadCounts(5, 5, 5)) == current
