"""The OutboundBot side of the simulator, through the unmodified alibabacloud_outboundbot20191226 SDK."""

from __future__ import annotations

import io
import time
import wave
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from alibabacloud_outboundbot20191226 import models as ob
from alibabacloud_tea_openapi.exceptions import ClientException, ServerException, ThrottlingException
from darabonba.exceptions import UnretryableException

from call_pipeline_tools.simulator import scenarios

INSTANCE = "inst-1"


def _load(sim, n: int = 30, gid: str = "jg-1", **kw) -> dict:
    group = scenarios.build_demo_job_group(gid, n, seed=kw.pop("seed", 1), **kw)
    sim.state.add_job_group(group)
    return group


def _page(client, gid: str, number: int, size: int, **kw):
    return client.list_jobs_by_group(ob.ListJobsByGroupRequest(
        instance_id=INSTANCE, job_group_id=gid, page_number=number, page_size=size, **kw))


def test_paging_through_1000_jobs_returns_each_job_once(sim, client):
    group = _load(sim, 1000)
    seen: list[str] = []
    number = 1
    while True:
        body = _page(client, "jg-1", number, 100).body
        assert body.success is True and body.code == "OK" and body.http_status_code == 200
        assert body.jobs.total_count == 1000 and body.jobs.page_size == 100 and body.jobs.page_number == number
        if not body.jobs.list:
            break
        assert len(body.jobs.list) <= 100
        seen += [job.job_id for job in body.jobs.list]
        number += 1
    assert number == 11
    assert len(seen) == len(set(seen)) == 1000
    assert set(seen) == {job["JobId"] for job in group["jobs"]}


def test_list_jobs_by_group_omits_tasks_and_filters(sim, client):
    group = _load(sim, 60)
    raw = requests.post(f"{sim.url}/?InstanceId=i&JobGroupId=jg-1&PageNumber=1&PageSize=5",
                        headers={"x-acs-action": "ListJobsByGroup"})
    assert raw.headers["Content-Type"] == "application/json;charset=utf-8"
    jobs = raw.json()["Jobs"]["List"]
    assert jobs and all("Tasks" not in job for job in jobs)
    assert all("_sim" not in job for job in jobs)

    failed = [j for j in group["jobs"] if j["Status"] == "Failed"]
    body = _page(client, "jg-1", 1, 100, job_status="Failed").body
    assert body.jobs.total_count == len(failed) > 0
    assert {j.job_id for j in body.jobs.list} == {j["JobId"] for j in failed}
    reason = failed[0]["FailureReason"]
    body = _page(client, "jg-1", 1, 100, job_failure_reason=reason).body
    assert body.jobs.total_count == sum(1 for j in group["jobs"] if j["FailureReason"] == reason)


def test_a_page_size_cap_serves_and_echoes_smaller_pages(sim, client):
    group = _load(sim, 130)
    assert requests.post(f"{sim.url}/__sim/page_size_cap", json={"cap": 50}).json()["ok"] is True
    pages = [_page(client, "jg-1", number, 100).body.jobs for number in (1, 2, 3)]
    assert [(p.page_size, len(p.list), p.total_count) for p in pages] == [(50, 50, 130), (50, 50, 130), (50, 30, 130)]
    assert [j.job_id for p in pages for j in p.list] == [j["JobId"] for j in group["jobs"]]
    assert _page(client, "jg-1", 1, 20).body.jobs.page_size == 20  # smaller sizes are served as asked
    # from page 2 on only: a cloud whose answers change size midway
    requests.post(f"{sim.url}/__sim/page_size_cap", json={"cap": 50, "from_page": 2})
    assert [_page(client, "jg-1", n, 100).body.jobs.page_size for n in (1, 2)] == [100, 50]
    requests.post(f"{sim.url}/__sim/page_size_cap", json={"cap": None})
    assert len(_page(client, "jg-1", 1, 100).body.jobs.list) == 100


def test_unknown_job_group_is_an_invalid_parameter(sim, client):
    with pytest.raises(ClientException) as e:
        _page(client, "jg-nope", 1, 10)
    assert e.value.code == "InvalidParameter"


def test_list_jobs_99_ids_ok_100_rejected_unknown_omitted(sim, client):
    group = _load(sim, 120)
    ids = [j["JobId"] for j in group["jobs"]]
    body = client.list_jobs(ob.ListJobsRequest(instance_id=INSTANCE, job_id=ids[:98] + ["no-such-job"])).body
    assert len(body.jobs) == 98
    assert [j.job_id for j in body.jobs] == ids[:98]
    finished = next(j for j in body.jobs if j.status == "Succeeded" and j.tasks and j.tasks[-1].conversation)
    last = finished.tasks[-1]
    assert last.task_id and last.planed_time <= last.actual_time
    assert {c.speaker for c in last.conversation} == {"Robot", "Contact"}
    assert all(isinstance(c.timestamp, int) for c in last.conversation)

    with pytest.raises(ClientException) as e:
        client.list_jobs(ob.ListJobsRequest(instance_id=INSTANCE, job_id=ids[:100]))
    assert e.value.code == "InvalidParameter" and e.value.status_code == 400


def test_download_recording_and_fetch_the_file(sim, client):
    group = _load(sim, 10)
    task_id = next(j["Tasks"][-1]["TaskId"] for j in group["jobs"] if j["Status"] == "Succeeded")
    params = client.download_recording(ob.DownloadRecordingRequest(instance_id=INSTANCE, task_id=task_id,
                                                                   need_voice_slice_recording=False)).body
    dp = params.download_params
    assert dp.file_name == f"{task_id}.wav"
    assert dp.signature_url.startswith(f"{sim.url}/__recordings/{task_id}.wav?Expires=")
    assert "Signature=" in dp.signature_url and dp.voice_slice_recording_list_json == "[]"
    audio = requests.get(dp.signature_url, timeout=5)
    assert audio.status_code == 200 and audio.headers["Content-Type"] == "audio/wav"
    with wave.open(io.BytesIO(audio.content)) as w:
        assert w.getnframes() > 0 and w.getframerate() == 8000

    with pytest.raises(ClientException) as e:
        client.download_recording(ob.DownloadRecordingRequest(instance_id=INSTANCE, task_id="no-such-task"))
    assert e.value.code == "InvalidParameter"
    assert requests.get(f"{sim.url}/__recordings/no-such-task.wav", timeout=5).status_code == 404
    expired = f"{sim.url}/__recordings/{task_id}.wav?Expires=1000&Signature=x"
    assert requests.get(expired, timeout=5).status_code == 403


def test_expired_recording_urls_go_to_tasks_that_had_none_and_a_url_asked_again_is_fresh(sim, client):
    group = _load(sim, 10)
    first, second = [j["Tasks"][-1]["TaskId"] for j in group["jobs"] if j["Status"] == "Succeeded"][:2]
    sim.state.expire_next_recording_urls(2)

    def fetch(task_id: str) -> int:
        url = client.download_recording(ob.DownloadRecordingRequest(
            instance_id=INSTANCE, task_id=task_id)).body.download_params.signature_url
        return requests.get(url, timeout=5).status_code

    assert fetch(first) == 403  # expired
    assert fetch(first) == 200  # asked for again: signed anew, though one expired URL is left
    assert fetch(second) == 403
    assert fetch(second) == 200


def test_describe_job_shape(sim, client):
    group = _load(sim, 20)
    job = next(j for j in group["jobs"] if j["Status"] == "Succeeded" and j["Tasks"][-1]["Conversation"])
    body = client.describe_job(ob.DescribeJobRequest(instance_id=INSTANCE, job_id=job["JobId"],
                                                     with_script=False)).body
    got = body.job
    assert got.job_id == job["JobId"] and got.instance_id == INSTANCE and got.status == "Succeeded"
    task = got.tasks[-1]
    assert task.end_time >= task.actual_time and task.end_reason in {"1", "3", "5"}
    assert task.hang_up_direction in {"client", "ivr"}
    assert task.conversation[0].sequence_id == "1"
    with pytest.raises(ClientException):
        client.describe_job(ob.DescribeJobRequest(instance_id=INSTANCE, job_id="no-such-job"))


def test_describe_job_group_progress(sim, client):
    group = _load(sim, 40)
    progress = client.describe_job_group(
        ob.DescribeJobGroupRequest(instance_id=INSTANCE, job_group_id="jg-1")).body.job_group.progress
    statuses = [j["Status"] for j in group["jobs"]]
    assert progress.total_jobs == 40
    assert progress.total_completed == sum(s in ("Succeeded", "Failed", "Cancelled") for s in statuses)
    assert progress.executing == statuses.count("Executing")
    assert progress.scheduling == statuses.count("Scheduling")
    assert progress.failed == statuses.count("Failed")
    assert progress.cancelled == statuses.count("Cancelled")


def test_query_jobs_with_result_shape_and_boolean_filter(sim, client):
    group = _load(sim, 40)
    body = client.query_jobs_with_result(ob.QueryJobsWithResultRequest(
        instance_id=INSTANCE, job_group_id="jg-1", page_number=1, page_size=7, has_answered_filter=True)).body
    answered = [j for j in group["jobs"]
                if j.get("Tasks") and j["Tasks"][-1]["Status"].startswith("Succeeded")]
    assert body.jobs.row_count == len(answered) > 0
    assert body.jobs.page_count == (len(answered) + 6) // 7
    row = body.jobs.list[0]
    assert row.id in {j["JobId"] for j in answered}
    assert row.latest_task.has_answered is True and isinstance(row.latest_task.call_time, int)
    assert row.latest_task.contact.job_uuid == row.id
    assert body.variable_names == ["意向"]

    body = client.query_jobs_with_result(ob.QueryJobsWithResultRequest(
        instance_id=INSTANCE, job_group_id="jg-1", page_number=1, page_size=100,
        job_status_filter='["Failed","Cancelled"]')).body
    assert body.jobs.row_count == sum(j["Status"] in ("Failed", "Cancelled") for j in group["jobs"])


def test_list_job_groups(sim, client):
    _load(sim, 5, gid="jg-a")
    _load(sim, 7, gid="jg-b")
    body = client.list_job_groups(ob.ListJobGroupsRequest(instance_id=INSTANCE, page_number=1, page_size=10)).body
    rows = {g.job_group_id: g for g in body.job_groups.list}
    assert body.job_groups.total_count == 2
    assert rows["jg-b"].progress.total_jobs == 7


def test_list_job_groups_filters_by_creation_time_and_status_as_the_sdk_sends_them(sim, client):
    for n, created in enumerate((1_000_000, 2_000_000, 3_000_000)):
        sim.state.add_job_group({"JobGroupId": f"jg-{n}", "CreationTime": created, "jobs": []})

    def listed(**kw):
        body = client.list_job_groups(ob.ListJobGroupsRequest(instance_id=INSTANCE, page_number=1, page_size=10,
                                                              **kw)).body
        return sorted(g.job_group_id for g in body.job_groups.list), body.job_groups.total_count

    assert listed(start_time=2_000_000) == (["jg-1", "jg-2"], 2)
    assert listed(start_time=1_500_000, end_time=2_500_000) == (["jg-1"], 1)
    assert listed(job_group_status_filter="Scheduling,Paused") == (["jg-0", "jg-1", "jg-2"], 3)  # no jobs yet
    assert listed(search_text="jg-2") == (["jg-2"], 1)


def test_a_group_paused_by_the_control_endpoint_says_so_in_both_answers_until_unpinned(sim, client):
    _load(sim, 5, gid="jg-a")
    _load(sim, 5, gid="jg-b")
    resp = requests.post(f"{sim.url}/__sim/job_group_status", json={"job_group_id": "jg-a", "status": "Paused"})
    assert resp.json() == {"ok": True, "status": "Paused"}
    described = client.describe_job_group(ob.DescribeJobGroupRequest(instance_id=INSTANCE, job_group_id="jg-a"))
    assert described.body.job_group.status == "Paused" and described.body.job_group.progress.status == "Paused"
    body = client.list_job_groups(ob.ListJobGroupsRequest(instance_id=INSTANCE, page_number=1, page_size=10,
                                                          job_group_status_filter="Paused,Draft")).body
    assert [(g.job_group_id, g.status) for g in body.job_groups.list] == [("jg-a", "Paused")]
    requests.post(f"{sim.url}/__sim/job_group_status", json={"job_group_id": "jg-a", "status": None})
    described = client.describe_job_group(ob.DescribeJobGroupRequest(instance_id=INSTANCE, job_group_id="jg-a"))
    assert described.body.job_group.status != "Paused"  # follows its jobs again
    assert requests.post(f"{sim.url}/__sim/job_group_status",
                         json={"job_group_id": "jg-a", "status": "Halted"}).status_code == 400
    assert requests.post(f"{sim.url}/__sim/job_group_status",
                         json={"job_group_id": "jg-zz", "status": "Paused"}).status_code == 400


def test_unknown_action_is_404_json(sim):
    resp = requests.post(f"{sim.url}/?InstanceId=i", headers={"x-acs-action": "NoSuchAction"})
    assert resp.status_code == 404
    assert resp.json()["Code"] == "InvalidAction.NotFound"
    # The legacy v2 signature puts Action in the query instead.
    resp = requests.post(f"{sim.url}/?Action=ListJobGroups&PageNumber=1&PageSize=1")
    assert resp.status_code == 200 and resp.json()["Success"] is True


# -- injected faults -------------------------------------------------------------------------


def test_throttling_fault_is_a_client_exception_then_clears(sim, client):
    _load(sim, 5)
    sim.state.inject_fault(action="ListJobsByGroup", status=400, code="Throttling.User", times=1)
    with pytest.raises(ClientException) as e:
        _page(client, "jg-1", 1, 10)
    assert e.value.code == "Throttling.User" and e.value.status_code == 400
    assert e.value.data["Message"] == "Request was denied due to user flow control."
    assert _page(client, "jg-1", 1, 10).body.jobs.total_count == 5


def test_retry_after_header_gives_throttling_exception(sim, client):
    _load(sim, 5)
    sim.state.inject_fault(action="*", status=400, code="Throttling.User", headers={"x-acs-retry-after": "200"})
    with pytest.raises(ThrottlingException) as e:
        _page(client, "jg-1", 1, 10)
    assert e.value.retry_after == 200


def test_503_is_a_server_exception(sim, client):
    _load(sim, 5)
    sim.state.inject_fault(action="ListJobsByGroup", status=503)
    with pytest.raises(ServerException) as e:
        _page(client, "jg-1", 1, 10)
    assert e.value.code == "ServiceUnavailable"


def test_raw_html_502_is_unretryable(sim, client):
    _load(sim, 5)
    sim.state.inject_fault(action="ListJobsByGroup", status=502, raw_body="<html>bad gateway</html>")
    with pytest.raises(UnretryableException):
        _page(client, "jg-1", 1, 10)


def test_success_false_does_not_raise(sim, client):
    _load(sim, 5)
    sim.state.inject_fault(action="ListJobsByGroup", success_false=True, status=404, code="Instance.NotExists")
    resp = _page(client, "jg-1", 1, 10)
    assert resp.status_code == 200
    assert resp.body.success is False and resp.body.code == "Instance.NotExists"
    assert resp.body.http_status_code == 404 and resp.body.jobs is None


@pytest.mark.serial
def test_latency_beyond_read_timeout_raises(sim, make_client):
    _load(sim, 5)
    client = make_client(read_timeout=300)
    sim.state.inject_fault(action="ListJobsByGroup", latency_ms=1000)
    t0 = time.monotonic()
    with pytest.raises(UnretryableException) as e:
        _page(client, "jg-1", 1, 10)
    assert time.monotonic() - t0 < 0.9
    assert "timed out" in str(e.value).lower()


def test_fault_scoped_to_job_ids(sim, client):
    group = _load(sim, 10)
    ids = [j["JobId"] for j in group["jobs"]]
    sim.state.inject_fault(action="ListJobs", status=500, job_ids=[ids[3]], times=None)
    assert len(client.list_jobs(ob.ListJobsRequest(instance_id=INSTANCE, job_id=ids[:3])).body.jobs) == 3
    for _ in range(2):
        with pytest.raises(ServerException):
            client.list_jobs(ob.ListJobsRequest(instance_id=INSTANCE, job_id=ids[2:5]))
    sim.state.clear_faults()
    assert len(client.list_jobs(ob.ListJobsRequest(instance_id=INSTANCE, job_id=ids[2:5])).body.jobs) == 3


def test_faults_over_http_control_plane(sim, client):
    _load(sim, 5)
    resp = requests.post(f"{sim.url}/__sim/faults",
                         json={"action": "ListJobsByGroup", "status": 400, "code": "Throttling.User", "times": 2})
    assert resp.status_code == 200 and resp.json()["faults"][0]["times"] == 2
    assert len(requests.get(f"{sim.url}/__sim/faults").json()["faults"]) == 1
    with pytest.raises(ClientException):
        _page(client, "jg-1", 1, 10)
    assert requests.delete(f"{sim.url}/__sim/faults").json() == {"ok": True}
    assert _page(client, "jg-1", 1, 10).body.success is True
    assert requests.post(f"{sim.url}/__sim/faults", json={"actoin": "typo"}).status_code == 400
    assert requests.post(f"{sim.url}/__sim/faults", json={"action": "ListJobs"}).status_code == 400  # no effect
    assert requests.post(f"{sim.url}/__sim/faults", json={"status": 500, "times": 0}).status_code == 400


# -- QPS cap, latency, stats ---------------------------------------------------------------------


@pytest.mark.serial
def test_qps_cap_throttles_a_burst_and_stats_count_it(sim, client):
    _load(sim, 5)
    requests.post(f"{sim.url}/__sim/qps", json={"cap": 5}).raise_for_status()

    def call(_: int) -> str:
        try:
            _page(client, "jg-1", 1, 10)
            return "ok"
        except ClientException as e:
            return e.code

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(call, range(20)))
    stats = requests.get(f"{sim.url}/__sim/stats").json()
    # 20 arrivals span at most two wall-clock seconds, so at most 2 × cap get through.
    assert outcomes.count("ok") <= 10
    assert outcomes.count("Throttling.User") == 20 - outcomes.count("ok") == stats["throttled"]
    assert stats["requests"]["ListJobsByGroup"] == 20
    assert stats["max_requests_per_second"] >= 10
    assert sum(stats["per_second"].values()) == 20

    sim.state.set_qps_cap(None)
    sim.state.reset_stats()
    _page(client, "jg-1", 1, 10)
    stats = sim.state.stats()
    assert stats["throttled"] == 0 and stats["requests"] == {"ListJobsByGroup": 1}


def test_latency_is_per_request_and_requests_overlap(sim, client):
    _load(sim, 5)
    requests.post(f"{sim.url}/__sim/latency", json={"outboundbot_ms": 300}).raise_for_status()
    t0 = time.monotonic()
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda _: _page(client, "jg-1", 1, 10), range(10)))
    elapsed = time.monotonic() - t0
    assert 0.3 <= elapsed < 1.5  # ten 300 ms requests in flight together, not one after another
    assert sim.state.stats()["max_outboundbot_in_flight"] >= 5


def test_jobs_gone_are_no_longer_returned_by_list_jobs(sim, client):
    group = _load(sim, 5)
    ids = [job["JobId"] for job in group["jobs"]]
    answer = requests.post(f"{sim.url}/__sim/jobs_gone", json={"job_ids": ids[:2]}, timeout=5).json()
    assert answer == {"ok": True, "job_ids": sorted(ids[:2])}
    body = client.list_jobs(ob.ListJobsRequest(instance_id=INSTANCE, job_id=ids)).body
    assert [job.job_id for job in body.jobs] == ids[2:]
    with pytest.raises(ClientException):
        client.describe_job(ob.DescribeJobRequest(instance_id=INSTANCE, job_id=ids[0]))
    requests.post(f"{sim.url}/__sim/jobs_gone", json={"job_ids": []}, timeout=5)
    body = client.list_jobs(ob.ListJobsRequest(instance_id=INSTANCE, job_id=ids)).body
    assert [job.job_id for job in body.jobs] == ids


def test_download_recording_not_exist_for_a_chosen_task(sim, client):
    group = _load(sim, 5, status_mix={"Succeeded": 1.0})
    task_ids = [job["Tasks"][-1]["TaskId"] for job in group["jobs"]]
    sim.state.inject_fault(action="DownloadRecording", status=404, code="Recording.NotExist", job_ids=[task_ids[0]],
                           times=None)
    for _ in range(2):
        with pytest.raises(ClientException) as info:
            client.download_recording(ob.DownloadRecordingRequest(instance_id=INSTANCE, task_id=task_ids[0]))
        assert info.value.code == "Recording.NotExist" and info.value.status_code == 404
    body = client.download_recording(ob.DownloadRecordingRequest(instance_id=INSTANCE, task_id=task_ids[1])).body
    assert body.download_params.signature_url
