"""SPEC §12 on job groups, through the real SDK against the simulator and a real CRM on MariaDB:
the sensors ask about the groups they watch only, and a group that stops raises an alert."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import pytest
import sqlalchemy as sa

from call_pipeline import sensors
from call_pipeline.crm.database import get_crm_engine
from call_pipeline.crm.schema import call_tasks
from call_pipeline.definitions import defs
from call_pipeline.resources import CrmDatabase
from call_pipeline.settings import settings
from call_pipeline_tests.pipeline_harness import (
    create_task,
    new_reference,
    pipeline_resources,
    project_instance_for_test,
)
from call_pipeline_tools.simulator.scenarios import DEFAULT_BASE_TIME_MS, build_job_group

DAY_MS = 86_400_000
PAST_GROUPS = 5_000
WATCHED = 100


@pytest.fixture(autouse=True)
def _credentials(monkeypatch):
    # Validating a run request resolves the job's resource config, credentials included.
    for name in ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "OUTBOUNDBOT_INSTANCE_ID",
                 "DASHSCOPE_API_KEY"):
        monkeypatch.setenv(name, "test-value")


@pytest.fixture
def instance():
    with project_instance_for_test() as instance:
        yield instance


class Ticks:
    """Evaluates a sensor tick after tick, handing each tick the previous one's cursor as the
    daemon does, and counts the OutboundBot calls each tick made (the simulator's own counters)."""

    def __init__(self, sensor, instance, crm_url, simulator) -> None:
        resources = pipeline_resources(crm_url, simulator)
        self.resources = {"crm": resources["crm"], "outboundbot": resources["outboundbot"]}
        self.sensor, self.instance, self.simulator, self.cursor = sensor, instance, simulator, None

    def __call__(self):
        before = dict(self.simulator.state.stats()["requests"])
        context = dg.build_sensor_context(instance_ref=self.instance.get_ref(), definitions=defs,
                                          resources=self.resources, cursor=self.cursor)
        result = self.sensor.evaluate_tick(context)
        self.cursor = getattr(result, "cursor", None) or self.cursor
        after = self.simulator.state.stats()["requests"]
        calls = {action: after[action] - before.get(action, 0) for action in after
                 if after[action] != before.get(action, 0)}
        return result, calls


def test_sensors_calls_per_tick_grow_with_the_watched_tasks_not_with_the_instances_history(
        mariadb_url, instance, simulator):
    """An instance with 5,000 past job groups, 100 active tasks (call_task_sensor) and 100 tasks
    concluded this week (late_jobs_sensor). Before: each sensor paged ListJobGroups over all
    5,200 groups every tick (52 calls). Now the first tick costs at most one call more than a
    DescribeJobGroup per watched group, and every later tick lists only the groups created since
    the oldest watched one (100 and 200 here: 1 or 2 calls), whatever the history."""
    for n in range(PAST_GROUPS):  # last year's campaigns, all completed
        simulator.state.add_job_group({"JobGroupId": f"jg-past-{n}", "jobs": [],
                                       "CreationTime": DEFAULT_BASE_TIME_MS - 400 * DAY_MS + n * 60_000})
    engine = get_crm_engine(mariadb_url)
    concluded, late = {}, []
    for n in range(WATCHED):  # concluded this week; 10 of their groups got a job late
        group_id = f"jg-done-{n}"
        task_id = create_task(mariadb_url, task_type=4, job_group_id=group_id)
        lead = {"leads_id": 1, "leads_phone": f"1370000{n:04d}", "reference_id": new_reference(task_id, 1)}
        group = build_job_group(group_id, [lead] if n < 10 else [], task_id=task_id, seed=n,
                                status_mix={"Succeeded": 1.0})
        simulator.state.add_job_group({**group, "CreationTime": DEFAULT_BASE_TIME_MS - 10 * DAY_MS + n})
        concluded[task_id] = group_id
        if n < 10:
            late.append(task_id)
    with engine.begin() as conn:
        conn.execute(sa.update(call_tasks).where(call_tasks.c.id.in_(list(concluded)))
                     .values(updated_time=CrmDatabase(url=mariadb_url).now()))
    active = {}
    for n in range(WATCHED):  # this week's live campaigns
        group_id = f"jg-live-{n}"
        active[create_task(mariadb_url, task_type=2, job_group_id=group_id)] = group_id
        simulator.state.add_job_group({"JobGroupId": group_id, "jobs": [],
                                       "CreationTime": DEFAULT_BASE_TIME_MS - DAY_MS + n})
    all_groups = PAST_GROUPS + 2 * WATCHED
    before = math.ceil(all_groups / sensors.JOB_GROUPS_PAGE_SIZE)  # the unfiltered listing, every tick

    figures = {}
    for sensor in (sensors.make_call_task_sensor(), sensors.make_late_jobs_sensor()):
        tick = Ticks(sensor, instance, mariadb_url, simulator)
        results, calls = zip(*(tick() for _ in range(3)), strict=True)
        figures[sensor.name] = [sum(c.values()) for c in calls]
        # every tick: at most one call more than a describe per watched task, and never the history's pages
        assert all(sum(c.values()) <= min(before, WATCHED + 1) for c in calls), calls
        # once the creation times are known: at most the pages of the groups created since the oldest
        # watched one (the listing stops once every watched group is found)
        created_since = WATCHED if sensor.name == "call_task_sensor" else 2 * WATCHED
        for later in calls[1:]:
            assert set(later) == {"ListJobGroups"}, later
            assert later["ListJobGroups"] <= math.ceil(created_since / sensors.JOB_GROUPS_PAGE_SIZE), later
        if sensor.name == "call_task_sensor":
            # every task's group was read: a first run for each, tagged with its progress and status
            requests = results[0].run_requests
            assert len(requests) == WATCHED
            assert {r.tags["call_pipeline/progress"] for r in requests} == {"0/0"}
            assert {r.tags["call_pipeline/group_status"] for r in requests} == {"Scheduling"}
        else:
            assert sorted(int(r.partition_key) for r in results[1].run_requests) == sorted(late)
    print(f"\nOutboundBot calls per tick, {WATCHED} watched tasks per sensor, {all_groups} job groups in the "
          f"instance: before {before} per sensor (unfiltered ListJobGroups); now {figures} (ticks 1, 2, 3)")


@pytest.fixture
def webhook():
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.endswith("/down"):  # a chat service that is down
                self.send_response(503)
                self.end_headers()
                return
            received.append(json.loads(body))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class Clock:
    """Stands in for the `time` module inside sensors.py: the day passes in a test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def test_a_group_stopped_past_the_threshold_alerts_once_a_day_and_one_stopped_shorter_does_not(
        mariadb_url, instance, simulator, webhook, monkeypatch):
    url, received = webhook
    monkeypatch.setattr(settings(), "alert_webhook_url", url)
    monkeypatch.setattr(settings(), "alert_format", "json")
    monkeypatch.setattr(settings(), "stalled_group_seconds", 600)
    clock = Clock(1_780_000_000.0)
    monkeypatch.setattr(sensors, "time", clock)
    paused = create_task(mariadb_url, name="暂停的活动", job_group_id="jg-paused")
    later = create_task(mariadb_url, name="后来暂停", job_group_id="jg-later")
    draft = create_task(mariadb_url, name="草稿", job_group_id="jg-draft")
    simulator.state.add_job_group({"JobGroupId": "jg-paused", "jobs": []})
    simulator.state.add_job_group({"JobGroupId": "jg-later", "jobs": []})
    simulator.state.add_job_group({"JobGroupId": "jg-draft", "Status": "Draft", "jobs": []})  # the scenario flag
    simulator.state.set_job_group_status("jg-paused", "Paused")
    tick = Ticks(sensors.make_call_task_sensor(), instance, mariadb_url, simulator)

    tick()  # first seen stopped: jg-paused and jg-draft
    assert received == []
    clock.now += 601
    simulator.state.set_job_group_status("jg-later", "Paused")  # paused just now
    result, _ = tick()
    assert sorted(a["task_id"] for a in received) == sorted([str(paused), str(draft)])
    alert = next(a for a in received if a["task_id"] == str(paused))
    assert alert["kind"] == "job_group_stopped" and alert["status"] == "Paused" and alert["task_name"] == "暂停的活动"
    assert alert["job_group_id"] == "jg-paused" and alert["stopped_hours"] == 0.2
    assert {r.tags.get("call_pipeline/group_status") for r in result.run_requests} >= {"Paused", "Draft"}

    for step in (60, 3_600, 80_000):  # the rest of the day: no second alert for them; jg-later's comes
        clock.now += step
        tick()
    assert sorted(a["task_id"] for a in received) == sorted([str(paused), str(draft), str(later)])

    received.clear()
    simulator.state.set_job_group_status("jg-draft", "Executing")  # started: forgotten
    clock.now = clock.now - 60 - 3_600 - 80_000 + 86_400  # a day after the first alerts
    tick()
    assert [a["task_id"] for a in received] == [str(paused)]  # still paused: told again, once a day
    assert str(draft) not in json.loads(tick.cursor)["stopped"]


def test_a_failed_alert_post_is_tried_again_at_the_next_tick(mariadb_url, instance, simulator, webhook,
                                                              monkeypatch):
    url, received = webhook
    monkeypatch.setattr(settings(), "alert_webhook_url", url.replace("/hook", "/down"))
    monkeypatch.setattr(settings(), "stalled_group_seconds", 600)
    clock = Clock(1_780_000_000.0)
    monkeypatch.setattr(sensors, "time", clock)
    task_id = create_task(mariadb_url, job_group_id="jg-p")
    simulator.state.add_job_group({"JobGroupId": "jg-p", "Status": "Paused", "jobs": []})
    tick = Ticks(sensors.make_call_task_sensor(), instance, mariadb_url, simulator)
    tick()
    clock.now += 601
    tick()  # the webhook answers 503 (after the client's retries): not remembered as sent
    assert json.loads(tick.cursor)["stopped"][str(task_id)][2] is None and received == []
    monkeypatch.setattr(settings(), "alert_webhook_url", url)
    clock.now += 30
    tick()
    assert [a["task_id"] for a in received] == [str(task_id)]
    tick()
    assert len(received) == 1


@pytest.mark.parametrize("executor", ["in_process", "multiprocess"])
def test_the_run_summary_and_the_tasks_history_show_the_groups_status(mariadb_url, instance, simulator, executor):
    """A run the sensor did not launch reads the status in the DescribeJobGroup call it makes for
    its progress anyway (no call of its own), in its first op, and its last op (another process on
    the multiprocess executor) shows it; a sensor run takes the status the sensor saw. A paused
    group's task stays at 2."""
    from call_pipeline.ops import GROUP_STATUS_TAG, PROGRESS_TAG
    from call_pipeline_tests.pipeline_harness import run_sync, snapshot
    from call_pipeline_tests.test_sync_job import create_task_leads

    task_id = create_task(mariadb_url, job_group_id="jg-held", leads=[])
    leads = [{"leads_id": n, "leads_phone": f"1360000{n:04d}", "reference_id": new_reference(task_id, n)}
             for n in (1, 2, 3)]
    create_task_leads(mariadb_url, task_id, leads)
    group = build_job_group("jg-held", leads, task_id=task_id, seed=3, status_mix={"Succeeded": 1.0})
    group["jobs"][2]["Status"] = "Paused"  # the campaign was paused before its last call
    simulator.state.add_job_group({**group, "Status": "Paused"})

    def history():
        event = instance.get_latest_materialization_event(dg.AssetKey(["crm", "leads_task_list"]))
        return {k: v.value for k, v in event.asset_materialization.metadata.items()}

    describes = simulator.state.stats()["requests"].get("DescribeJobGroup", 0)
    result = run_sync(mariadb_url, simulator, task_id, instance, executor=executor)  # as from a backfill: no tags
    assert result.success
    assert simulator.state.stats()["requests"]["DescribeJobGroup"] == describes + 1  # the progress's own call
    assert instance.get_run_by_id(result.run_id).tags[GROUP_STATUS_TAG] == "Paused"
    metadata = history()
    assert metadata["job_group_status"] == "Paused" and "| job group status | Paused |" in metadata["summary"]
    assert snapshot(mariadb_url, task_id).task_type == 2

    simulator.state.set_job_group_status("jg-held", None)
    simulator.state.set_job_status(group["jobs"][2]["JobId"], "Succeeded")
    describes = simulator.state.stats()["requests"]["DescribeJobGroup"]
    # as the sensor asks (the harness passes a run's tags on in process only)
    result = run_sync(mariadb_url, simulator, task_id, instance,
                      tags={PROGRESS_TAG: "3/3", GROUP_STATUS_TAG: "Completed"})
    assert result.success
    assert simulator.state.stats()["requests"]["DescribeJobGroup"] == describes
    metadata = history()
    assert metadata["job_group_status"] == "Completed" and "| job group status | Completed |" in metadata["summary"]
    assert snapshot(mariadb_url, task_id).task_type == 4
