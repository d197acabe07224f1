"""The OutboundBot wrapper through the real SDK against the simulator: paging, the 99-id limit,
recordings, and every injected fault (retried, then a clear error)."""

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from call_pipeline.clients.limits import SharedRateLimiter
from call_pipeline.clients.outboundbot import (
    OutboundBotClient,
    OutboundBotError,
    split_for_list_jobs,
)
from call_pipeline.resources import OutboundBotResource
from call_pipeline.steps.paging import count_job_pages
from call_pipeline_tools.simulator.scenarios import build_job_group


def make_client(simulator, tmp_path, **overrides) -> OutboundBotClient:
    settings = OutboundBotResource(
        access_key_id="test-ak", access_key_secret="test-secret", instance_id="inst-test",
        endpoint=simulator.endpoint, protocol="http",
        read_timeout_ms=overrides.pop("read_timeout_ms", 2000), connect_timeout_ms=1000,
        backoff_ms=overrides.pop("backoff_ms", 20), max_backoff_ms=200, **overrides,
    ).client_config()
    limiter = SharedRateLimiter(f"test-{simulator.port}", 500.0, tmp_path)
    return OutboundBotClient(settings, limiter)


def leads(n: int, task_id: int = 1) -> list[dict]:
    return [{"leads_id": i, "reference_id": f"{task_id}9{i}", "leads_phone": f"1380000{i:04d}",
             "organization_id": 9} for i in range(1, n + 1)]


@pytest.fixture
def group(simulator):
    simulator.state.add_job_group(build_job_group("jg-t", leads(250), task_id=1, seed=3))
    return "jg-t"


def all_job_ids(client: OutboundBotClient, group: str) -> list[str]:
    pages = count_job_pages(client, group, 100)
    return [job["JobId"] for page in range(1, pages + 1)
            for job in client.list_jobs_by_group(group, page, 100)["Jobs"]["List"]]


def test_pages_through_the_whole_group(simulator, tmp_path, group):
    client = make_client(simulator, tmp_path)
    job_ids = all_job_ids(client, group)
    assert len(job_ids) == 250 == len(set(job_ids))
    # one call for the count, then one per page of 100
    assert simulator.state.stats()["requests"]["ListJobsByGroup"] == 1 + 3


def test_list_jobs_enforces_99_ids_and_batches(simulator, tmp_path, group):
    client = make_client(simulator, tmp_path)
    job_ids = all_job_ids(client, group)
    with pytest.raises(ValueError, match="at most 99"):
        client.list_jobs(job_ids[:100])
    calls = split_for_list_jobs(job_ids)
    assert [len(ids) for ids in calls] == [99, 99, 52]
    returned = [job["JobId"] for ids in calls for job in client.list_jobs(ids)["Jobs"]]
    assert sorted(returned) == sorted(job_ids)


def test_download_recording_returns_a_fetchable_url(simulator, tmp_path, group):
    import requests

    client = make_client(simulator, tmp_path)
    job_ids = all_job_ids(client, group)
    jobs = [job for ids in split_for_list_jobs(job_ids) for job in client.list_jobs(ids)["Jobs"]]
    task_id = next(job["Tasks"][-1]["TaskId"] for job in jobs if job.get("Status") == "Succeeded" and job.get("Tasks"))
    url = client.download_recording(task_id)
    response = requests.get(url, timeout=5)
    assert response.status_code == 200 and response.content[:4] == b"RIFF"
    with pytest.raises(OutboundBotError) as info:
        client.download_recording("no-such-task")
    assert info.value.retryable is False


@pytest.mark.parametrize(
    ("fault", "expected_code"),
    [
        ({"status": 400, "code": "Throttling.User", "message": "Request was denied due to user flow control."},
         "Throttling.User"),
        ({"status": 503, "code": "ServiceUnavailable", "message": "temporary failure"}, "ServiceUnavailable"),
        ({"status": 500, "code": "InternalError", "message": "boom"}, "InternalError"),
        ({"status": 429, "code": "Throttling", "message": "slow down", "headers": {"x-acs-retry-after": "50"}},
         "Throttling"),
    ],
)
def test_transient_faults_are_retried_then_succeed(simulator, tmp_path, group, fault, expected_code):
    client = make_client(simulator, tmp_path)
    simulator.state.inject_fault(action="ListJobsByGroup", times=2, **fault)
    body = client.list_jobs_by_group(group, 1, 10)
    assert len(body["Jobs"]["List"]) == 10
    assert simulator.state.stats()["requests"]["ListJobsByGroup"] == 3


@pytest.mark.parametrize(
    ("fault", "expected_code"),
    [
        ({"status": 400, "code": "Throttling.User", "message": "flow control"}, "Throttling.User"),
        ({"status": 503, "code": "ServiceUnavailable", "message": "temporary failure"}, "ServiceUnavailable"),
    ],
)
def test_faults_longer_than_the_retry_budget_give_a_clear_error(simulator, tmp_path, group, fault, expected_code):
    client = make_client(simulator, tmp_path)
    simulator.state.inject_fault(action="ListJobs", times=10, **fault)
    with pytest.raises(OutboundBotError) as info:
        client.list_jobs(["job-x"])
    assert info.value.code == expected_code
    assert info.value.retryable is True
    assert "ListJobs" in str(info.value) and "test-secret" not in str(info.value)
    assert simulator.state.stats()["requests"]["ListJobs"] == 3


def test_non_json_gateway_error_is_a_clear_error(simulator, tmp_path, group):
    client = make_client(simulator, tmp_path)
    simulator.state.inject_fault(action="ListJobsByGroup", status=502, raw_body="<html>502 Bad Gateway</html>", times=5)
    with pytest.raises(OutboundBotError) as info:
        client.list_jobs_by_group(group, 1, 10)
    assert info.value.code == "BadResponse"


def test_success_false_is_an_error(simulator, tmp_path, group):
    client = make_client(simulator, tmp_path)
    simulator.state.inject_fault(action="ListJobs", success_false=True, code="Instance.NotExists",
                                 message="instance does not exist", times=1)
    with pytest.raises(OutboundBotError) as info:
        client.list_jobs(["job-1"])
    assert info.value.code == "Instance.NotExists"
    assert info.value.retryable is False


def test_read_timeout_is_retried_then_a_clear_error(simulator, tmp_path, group):
    client = make_client(simulator, tmp_path, read_timeout_ms=200)
    simulator.state.inject_fault(action="ListJobsByGroup", latency_ms=600, times=3)
    started = time.monotonic()
    with pytest.raises(OutboundBotError) as info:
        client.list_jobs_by_group(group, 1, 10)
    assert info.value.retryable is True
    assert info.value.code == "NetworkError"
    assert time.monotonic() - started >= 0.6  # three attempts of 0.2 s each
    # a single slow answer is absorbed by the retry
    simulator.state.clear_faults()
    simulator.state.inject_fault(action="ListJobsByGroup", latency_ms=600, times=1)
    assert len(client.list_jobs_by_group(group, 1, 10)["Jobs"]["List"]) == 10


def test_proxy_variables_do_not_leak_into_the_sdk(simulator, tmp_path, group, monkeypatch):
    # A proxy that does not exist: were it used, every call would fail.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    client = make_client(simulator, tmp_path)
    assert client.list_jobs_by_group(group, 1, 5)["Jobs"]["TotalCount"] == 250


def test_every_request_passes_the_rate_limiter_retries_included(simulator, tmp_path, group):
    settings = OutboundBotResource(access_key_id="a", access_key_secret="b", instance_id="i",
                                   endpoint=simulator.endpoint, protocol="http", backoff_ms=1,
                                   max_backoff_ms=2).client_config()
    limiter = SharedRateLimiter(f"count-{simulator.port}", 2.0, tmp_path)
    client = OutboundBotClient(settings, limiter)
    simulator.state.inject_fault(action="ListJobsByGroup", status=503, code="ServiceUnavailable", times=2)
    started = time.monotonic()
    client.list_jobs_by_group(group, 1, 10)
    client.list_jobs_by_group(group, 1, 10)
    # 4 requests (2 failed attempts, then 2 successes) at 2 per second: the last two wait a second
    assert simulator.state.stats()["requests"]["ListJobsByGroup"] == 4
    assert time.monotonic() - started >= 1.0


class _RecordingLimiter(SharedRateLimiter):
    """The real file limiter, noting for each grant whether the connection it was asked for was
    already open: what the cloud counts is the request's arrival, so the grant comes after the
    connection set-up (TCP, TLS) whose duration varies from one request to the next."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.grants: list[bool] = []

    def acquire(self) -> float:
        asker = sys._getframe(1).f_locals.get("self")
        self.grants.append(getattr(asker, "sock", None) is not None)
        return super().acquire()


def test_the_grant_is_taken_on_an_open_connection_right_before_the_request_is_written(simulator, tmp_path,
                                                                                      group):
    from darabonba.core import DaraCore

    settings = OutboundBotResource(access_key_id="a", access_key_secret="b", instance_id="i",
                                   endpoint=simulator.endpoint, protocol="http", backoff_ms=1,
                                   max_backoff_ms=2).client_config()
    limiter = _RecordingLimiter(f"open-{simulator.port}", 500.0, tmp_path)
    client = OutboundBotClient(settings, limiter)
    for key in [key for key in DaraCore._sessions if f":{simulator.port}:" in key]:
        del DaraCore._sessions[key]  # a new session: its first request opens a new connection
    simulator.state.inject_fault(action="ListJobsByGroup", status=503, code="ServiceUnavailable", times=1)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: client.list_jobs_by_group(group, 1, 5), range(4)))
    assert simulator.state.stats()["requests"]["ListJobsByGroup"] == 5  # one retried: five on the wire
    assert limiter.grants == [True] * 5


def test_threads_that_start_together_build_one_session(simulator, tmp_path, group, monkeypatch):
    from darabonba.core import DaraCore

    client = make_client(simulator, tmp_path)
    for key in [key for key in DaraCore._sessions if f":{simulator.port}:" in key]:
        del DaraCore._sessions[key]
    built = []
    original = DaraCore.get_adapter

    def counting_get_adapter(*args, **kwargs):
        built.append(args)
        time.sleep(0.05)  # as long as building its SSL context takes: the other threads arrive meanwhile
        return original(*args, **kwargs)

    monkeypatch.setattr(DaraCore, "get_adapter", staticmethod(counting_get_adapter))
    start = threading.Barrier(8)

    def call() -> int:
        start.wait()
        return client.list_jobs_by_group(group, 1, 5)["Jobs"]["TotalCount"]

    with ThreadPoolExecutor(8) as pool:
        totals = list(pool.map(lambda _: call(), range(8)))
    assert totals == [250] * 8
    assert len(built) == 1


def test_an_error_without_a_code_is_not_the_code_none(simulator, tmp_path):
    """The SDK formats a missing Code as the string "None"; the error says there was none."""
    simulator.state.inject_fault(action="ListJobs", status=404, raw_body='{"RequestId": "r-1", "Message": "gone"}',
                                 times=None)
    with pytest.raises(OutboundBotError) as info:
        make_client(simulator, tmp_path).list_jobs(["job-1"])
    assert info.value.code is None
    assert "None" not in str(info.value)
    assert str(info.value) == "OutboundBot ListJobs failed: error: HTTP 404: gone (request id r-1)"
