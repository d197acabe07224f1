"""The run task's permission to wait for step results (`celery_app.joins_allowed`), on Celery's own
process-wide guard, with runs overlapping in threads as on a threads-pool run worker."""

from __future__ import annotations

import threading

import pytest
from celery._state import _set_task_join_will_block
from celery.result import allow_join_result, assert_will_not_block

from call_pipeline.celery_app import _JoinAllowance


@pytest.fixture
def in_a_worker():
    """The guard as a Celery worker sets it before it runs tasks (`worker/components.py`)."""
    _set_task_join_will_block(True)
    yield
    _set_task_join_will_block(False)


def _overlap(allow) -> list[str]:
    """Run A starts, run B starts, A ends while B still waits for a step; what B's wait then meets."""
    b_started, a_ended = threading.Event(), threading.Event()
    met: list[str] = []

    def run_a() -> None:
        with allow():
            b_started.wait(10)
        a_ended.set()

    def run_b() -> None:
        with allow():
            b_started.set()
            a_ended.wait(10)
            try:
                assert_will_not_block()  # what dagster-celery's `result.get()` checks first
                met.append("allowed")
            except RuntimeError as exc:
                met.append(str(exc).splitlines()[0])

    threads = [threading.Thread(target=run_a), threading.Thread(target=run_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    return met


def test_celerys_own_allowance_is_taken_back_under_a_run_that_still_waits(in_a_worker) -> None:
    """Why the project does not use `allow_join_result` as it is: the race two runs on a threads
    pool met (a run failed with this message)."""
    assert _overlap(allow_join_result) == ["Never call result.get() within a task!"]


def test_a_run_may_wait_for_its_steps_while_another_run_ends(in_a_worker) -> None:
    assert _overlap(_JoinAllowance()) == ["allowed"]


def test_the_guard_is_back_once_the_last_run_ends(in_a_worker) -> None:
    allow = _JoinAllowance()
    with allow():
        with allow():
            assert_will_not_block()
        assert_will_not_block()
    with pytest.raises(RuntimeError, match="Never call result.get"):
        assert_will_not_block()
