"""OutboundBot faults: throttling bursts (with and without `x-acs-retry-after`) on each action,
shorter and longer than the retry budget; 500/503 bursts; read timeouts; a non-JSON 502 from a
gateway; HTTP 200 with `Success: false`. Each run is settled as an operator would (re-execute
from failure, relaunch) and the CRM must equal a clean run of the same scenario.

Retry budget per call: the SDK's own retry (3 attempts) × the op's RetryPolicy (2 tries in tests,
CALL_PIPELINE_OP_MAX_RETRIES=1). A burst of 2 is absorbed by the SDK; a burst of 7 outlasts both,
so a step fails and a re-execution from failure finishes the work. A recording that cannot be
fetched is left empty with a warning; the other recordings and the follow-ups are saved, and
then the run fails (before the task's state is advanced, so that a task at 4 never lacks one),
and the re-execution fetches it. DownloadRecording faults target one lead's job: the downloads
run in parallel, and an untargeted burst is spread over many leads' retries."""

from __future__ import annotations

import pytest

from call_pipeline_tests.reliability import scenarios
from call_pipeline_tests.reliability.harness import FAULT_RUNS_EXECUTOR, event_messages, settle
from call_pipeline_tests.reliability.invariant import Monitor, assert_matches_clean_run, normalized

SHORT, LONG = 2, 7  # failing answers in a row: within the SDK's retries / beyond SDK × op retries
ACTIONS = ("ListJobsByGroup", "ListJobs", "DownloadRecording")


def prepare(mariadb_url, simulator, clean_run):
    scenario = scenarios.mixed()
    clean = clean_run(scenario)
    scenario.install(mariadb_url, simulator)
    return scenario, clean


def settle_and_compare(mariadb_url, instance, scenario, clean, **compare_kw):
    with Monitor(mariadb_url, [scenario.task_id]):
        settled = settle(instance, mariadb_url, scenario.task_id, executor=FAULT_RUNS_EXECUTOR)
    assert_matches_clean_run(normalized(mariadb_url, scenario.task_id), clean, **compare_kw)
    return settled


def one_unit(scenario, action: str) -> dict:
    """A fault's target: one unit of `action`, so that the burst meets that unit's retries in a
    row however many steps run at once (one lead's recording or job, the last page)."""
    if action == "ListJobsByGroup":
        return {"page_number": 3}
    return {"job_ids": [scenario.job_of(scenarios.RECORDED)["JobId"]]}


def _throttling_cases():
    for action in ACTIONS:
        for burst in (SHORT, LONG):
            for retry_after in (False, True):
                marks = [pytest.mark.slow] if burst == LONG and not retry_after else []
                yield pytest.param(action, burst, retry_after, marks=marks,
                                   id=f"{action}-{'short' if burst == SHORT else 'long'}-"
                                      f"{'retry_after' if retry_after else 'no_header'}")


@pytest.mark.parametrize(("action", "burst", "retry_after"), list(_throttling_cases()))
def test_throttling_burst(mariadb_url, simulator, instance, env, clean_run, action, burst, retry_after):
    scenario, clean = prepare(mariadb_url, simulator, clean_run)
    headers = {"x-acs-retry-after": "100"} if retry_after else {}
    simulator.state.inject_fault(action=action, status=400, code="Throttling.User", times=burst, headers=headers,
                                 **one_unit(scenario, action))

    settled = settle_and_compare(mariadb_url, instance, scenario, clean)

    assert simulator.state.faults == []  # every throttled answer was served
    first = settled.attempts[0]
    messages = "\n".join(event_messages(instance, settled.run_ids))
    if burst == SHORT:
        # the SDK's retries absorbed it: the first run did everything
        assert first.success and len(settled.attempts) == 2, settled.attempts
        assert "Throttling.User" not in messages
    elif action == "DownloadRecording":
        # the lead's recording is left empty with a warning; the run fails after saving the rest
        assert not first.success and settled.attempts[1].kind == "from_failure", settled.attempts
        assert "recording not fetched (retried next run)" in messages and "Throttling.User" in messages
    else:
        # a step failed after every retry and said why; re-execution from failure finished the work
        assert not first.success and settled.attempts[1].kind == "from_failure", settled.attempts
        assert "Throttling.User" in messages


# A run launched without the sensor's progress tag reads the group's progress first (DescribeJobGroup,
# in list_job_pages' first attempt only; best effort: its 3 SDK attempts take 3 of the burst and its
# failure only warns); then the first page call has SDK x op retries (3 x 2 here) to absorb the rest.
@pytest.mark.parametrize(("status", "burst"), [(500, 4), pytest.param(503, 10, marks=pytest.mark.slow)])
def test_server_error_burst_on_every_action(mariadb_url, simulator, instance, env, clean_run, status, burst):
    scenario, clean = prepare(mariadb_url, simulator, clean_run)
    simulator.state.inject_fault(action="*", status=status, times=burst)

    settled = settle_and_compare(mariadb_url, instance, scenario, clean)

    assert simulator.state.faults == []
    if burst > 3 + 6:  # beyond the progress read and SDK × op retries on the first call: a failed run
        assert settled.failures >= 1
        code = "InternalError" if status == 500 else "ServiceUnavailable"
        assert code in "\n".join(event_messages(instance, settled.run_ids))


@pytest.mark.slow
@pytest.mark.parametrize(("action", "times"), [("ListJobsByGroup", 2), ("ListJobs", 7)])
def test_read_timeouts(mariadb_url, simulator, instance, env, clean_run, action, times):
    """Latency above the read timeout: the SDK times out and retries (RetryError); past the
    budget the step fails with a NetworkError naming the timeout and is re-executed."""
    env(read_timeout_ms=400)
    scenario, clean = prepare(mariadb_url, simulator, clean_run)
    simulator.state.inject_fault(action=action, latency_ms=1200, times=times, **one_unit(scenario, action))

    settled = settle_and_compare(mariadb_url, instance, scenario, clean)

    assert simulator.state.faults == []
    if times == 2:
        assert settled.attempts[0].success
    else:
        assert settled.failures >= 1
        assert "Read timed out" in "\n".join(event_messages(instance, settled.run_ids))


@pytest.mark.parametrize("action", ["ListJobsByGroup", "ListJobs", "DownloadRecording"])
def test_gateway_502_with_html_body(mariadb_url, simulator, instance, env, clean_run, action):
    """A gateway's HTML 502: the SDK cannot parse it and does not retry it; the op's RetryPolicy
    does (DownloadRecording: the lead's recording waits for the next run)."""
    scenario, clean = prepare(mariadb_url, simulator, clean_run)
    simulator.state.inject_fault(action=action, status=502, raw_body="<html><body>502 Bad Gateway</body></html>",
                                 times=1)

    settled = settle_and_compare(mariadb_url, instance, scenario, clean)

    assert simulator.state.faults == []
    messages = "\n".join(event_messages(instance, settled.run_ids))
    assert "502 Bad Gateway" in messages  # the log line says what came back


@pytest.mark.parametrize("action", ["ListJobsByGroup", "ListJobs", "DownloadRecording"])
def test_http_200_with_success_false(mariadb_url, simulator, instance, env, clean_run, action):
    """HTTP 200 with Success:false is an error (the SDK does not raise on it): the unit fails,
    says which code, and the op's RetryPolicy or the next run redoes it."""
    scenario, clean = prepare(mariadb_url, simulator, clean_run)
    simulator.state.inject_fault(action=action, success_false=True, status=500, code="InternalError",
                                 message="business failure for the test", times=2)

    settled = settle_and_compare(mariadb_url, instance, scenario, clean)

    assert simulator.state.faults == []
    messages = "\n".join(event_messages(instance, settled.run_ids))
    assert "business failure for the test" in messages
