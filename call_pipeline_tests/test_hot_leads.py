"""Hot leads (SPEC §11) against a real local HTTP server, in `sync_call_task` runs on MariaDB with
the simulator: every lead the AI marks interested is posted once, in each format, its phone masked;
a post that fails is made by a later run; no lead is posted twice."""

from __future__ import annotations

import json
import threading
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from call_pipeline.crm import repository as repo
from call_pipeline.crm.database import create_crm_engine
from call_pipeline.crm.schema import call_pipeline_hot_leads_posted
from call_pipeline.domain.alerts import hot_lead, hot_lead_payload
from call_pipeline.ops import CRM_ASSET_KEY
from call_pipeline.settings import settings
from call_pipeline_tests.pipeline_harness import (
    create_task,
    new_reference,
    project_instance_for_test,
    run_sync,
    snapshot,
)
from call_pipeline_tests.test_sync_job import create_task_leads
from call_pipeline_tools.simulator.scenarios import build_job_group

N = 12


class Webhook:
    def __init__(self) -> None:
        self.received: list[dict] = []  # the bodies it took (HTTP 200)
        self.refused = 0  # the posts it answered 500
        self.failing = False
        self.lock = threading.Lock()


@pytest.fixture
def webhook():
    hook = Webhook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with hook.lock:
                if hook.failing:
                    hook.refused += 1
                    self.send_response(500)
                    self.end_headers()
                    return
                hook.received.append(json.loads(body))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"errcode": 0, "errmsg": "ok"}')

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", hook
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def instance():
    with project_instance_for_test() as instance:
        yield instance


def a_task(crm_url: str, simulator, group_id: str) -> tuple[int, dict[int, int]]:
    """A task of N succeeded calls; returns it and the verdict the model gives each lead."""
    task_id = create_task(crm_url, name="春季试驾邀约", job_group_id=group_id, leads=[])
    leads = [{"leads_id": i, "leads_phone": f"1350000{i:04d}", "reference_id": new_reference(task_id, i)}
             for i in range(1, N + 1)]
    create_task_leads(crm_url, task_id, leads)
    group = build_job_group(group_id, leads, task_id=task_id, seed=21, status_mix={"Succeeded": 1.0})
    simulator.state.add_job_group(group)
    verdicts = {job["_sim"]["leads_id"]: job["_sim"]["expected_is_interested"] for job in group["jobs"]}
    assert 2 <= sum(v == 1 for v in verdicts.values()) < N
    return task_id, verdicts


def interested(verdicts: dict[int, int]) -> set[int]:
    return {leads_id for leads_id, verdict in verdicts.items() if verdict == 1}


def lead_of(post: dict, fmt: str) -> int:
    if fmt == "json":
        return post["lead_id"]
    text = json.dumps(post, ensure_ascii=False)
    return int(text.split("interested lead ", 1)[1].split(" ", 1)[0])


@pytest.mark.parametrize("fmt", ["json", "dingtalk", "wecom", "feishu", "slack"])
def test_each_interested_lead_is_posted_once_with_its_phone_masked(mariadb_url, simulator, instance, webhook,
                                                                    monkeypatch, fmt):
    url, hook = webhook
    monkeypatch.setattr(settings(), "hot_lead_webhook_url", url)
    monkeypatch.setattr(settings(), "alert_format", fmt)
    task_id, verdicts = a_task(mariadb_url, simulator, f"jg-hot-{fmt}")
    assert run_sync(mariadb_url, simulator, task_id, instance).success
    crm = snapshot(mariadb_url, task_id)
    assert {i for i, lead in crm.leads.items() if lead["is_interested"] == 1} == interested(verdicts)
    posted = [lead_of(post, fmt) for post in hook.received]
    assert sorted(posted) == sorted(interested(verdicts))  # each once; the others not at all

    text = json.dumps(hook.received, ensure_ascii=False)
    for leads_id in interested(verdicts):
        assert f"1350000{leads_id:04d}" not in text and f"135****{leads_id:04d}" in text
    post = next(p for p in hook.received if lead_of(p, fmt) == min(interested(verdicts)))
    lead = crm.leads[min(interested(verdicts))]
    follow_up = next(f for f in crm.follow_ups if f["id"] == lead["leads_follow_id"])
    if fmt == "json":
        assert post == {"task_id": task_id, "task_name": "春季试驾邀约", "lead_id": lead["leads_id"],
                        "remark": follow_up["leads_remark"],
                        "next_follow_time": follow_up["next_follow_time"].strftime("%Y-%m-%d %H:%M:%S")
                        if follow_up["next_follow_time"] else None,
                        "phone": f"135****{lead['leads_id']:04d}"}
    else:
        assert f"task {task_id} (春季试驾邀约)" in text and follow_up["leads_remark"] in text
        shape = {"dingtalk": ("msgtype", "markdown"), "wecom": ("msgtype", "markdown"),
                 "feishu": ("msg_type", "text"), "slack": ("text", None)}[fmt]
        assert shape[0] in post and (shape[1] is None or post[shape[0]] == shape[1])

    # a second run posts nothing again
    assert run_sync(mariadb_url, simulator, task_id, instance).success
    assert len(hook.received) == len(interested(verdicts))


def test_a_failed_post_is_made_by_a_later_run_and_no_lead_twice(mariadb_url, simulator, instance, webhook,
                                                                monkeypatch):
    url, hook = webhook
    monkeypatch.setattr(settings(), "hot_lead_webhook_url", url)
    monkeypatch.setattr(settings(), "alert_format", "json")
    task_id, verdicts = a_task(mariadb_url, simulator, "jg-hot-500")
    hook.failing = True
    first = run_sync(mariadb_url, simulator, task_id, instance)
    # the follow-ups are written whatever the webhook said, and the run succeeds
    assert first.success
    crm = snapshot(mariadb_url, task_id)
    assert all(lead["leads_follow_id"] for lead in crm.leads.values()) and crm.task_type == 4
    assert hook.refused >= 1 and not hook.received
    summary = _summary_metadata(instance, first.run_id)
    assert summary["hot_leads_not_posted"] >= 1 and summary["hot_leads_posted"] == 0
    messages = "\n".join(e.message or "" for e in instance.all_logs(first.run_id))
    assert "hot lead not posted (tried again next run)" in messages
    assert url not in messages  # the webhook's URL is a secret

    hook.failing = False
    # the task is at 4 now: a run for its late work (what the late-jobs sensor requests) posts them
    second = run_sync(mariadb_url, simulator, task_id, instance, tags={"call_pipeline/late_jobs": "true"})
    assert second.success
    assert sorted(p["lead_id"] for p in hook.received) == sorted(interested(verdicts))
    assert _summary_metadata(instance, second.run_id)["hot_leads_posted"] == len(interested(verdicts))
    run_sync(mariadb_url, simulator, task_id, instance, tags={"call_pipeline/late_jobs": "true"})
    assert sorted(p["lead_id"] for p in hook.received) == sorted(interested(verdicts))


def _summary_metadata(instance, run_id: str) -> dict:
    event = next(e for e in instance.all_logs(run_id)
                 if e.dagster_event and e.dagster_event.event_type_value == "ASSET_MATERIALIZATION"
                 and e.dagster_event.asset_key == CRM_ASSET_KEY)
    metadata = event.dagster_event.event_specific_data.materialization.metadata
    return {k: v.value for k, v in metadata.items()}


def test_two_runs_claiming_one_lead_one_wins(crm_url):
    engine = create_crm_engine(crm_url)
    repo_now = datetime(2026, 11, 28, 10, 0)
    from call_pipeline.crm.database import ensure_pipeline_tables

    ensure_pipeline_tables(engine)
    with repo.write_transaction(engine) as conn:
        assert repo.claim_hot_lead(conn, 5, 1, "run-a", repo_now)
    with repo.write_transaction(engine) as conn:
        assert not repo.claim_hot_lead(conn, 5, 1, "run-b", repo_now)
        repo.release_hot_lead(conn, 5, "run-b")  # not its claim: nothing happens
        repo.mark_hot_lead_posted(conn, 5, "run-b", repo_now)
    with engine.connect() as conn:
        row = conn.execute(call_pipeline_hot_leads_posted.select()).one()
    assert (row.claim_token, row.posted_time) == ("run-a", None)
    with repo.write_transaction(engine) as conn:
        repo.release_hot_lead(conn, 5, "run-a")  # its post failed: free again
        assert repo.claim_hot_lead(conn, 5, 1, "run-b", repo_now)
        repo.mark_hot_lead_posted(conn, 5, "run-b", repo_now)
        repo.release_hot_lead(conn, 5, "run-b")  # posted: a claim that posted is never released
    with engine.connect() as conn:
        row = conn.execute(call_pipeline_hot_leads_posted.select()).one()
    assert (row.claim_token, row.posted_time) == ("run-b", repo_now)


def test_the_post_masks_every_phone_and_takes_each_format():
    lead = hot_lead(3, "任务", 42, "客户说打 13912345678 找他，明天下午到店", datetime(2026, 12, 6, 15, 0),
                    "+86 139-1234-5678")
    assert lead.phone == "139****5678" and "13912345678" not in lead.remark and "139****5678" in lead.remark
    assert hot_lead_payload(lead, "json")["next_follow_time"] == "2026-12-06 15:00:00"
    assert hot_lead_payload(lead, "dingtalk")["msgtype"] == "markdown"
    assert "139****5678" in hot_lead_payload(lead, "wecom")["markdown"]["content"]
    assert "interested lead 42 in task 3 (任务)" in hot_lead_payload(lead, "feishu")["content"]["text"]
    assert "2026-12-06 15:00:00" in hot_lead_payload(lead, "slack")["text"]
    with pytest.raises(ValueError, match="CALL_PIPELINE_ALERT_FORMAT"):
        hot_lead_payload(lead, "telegram")


def test_an_unposted_hot_lead_is_work_left_for_the_sensors(crm_url):
    """The run that concluded a task may have failed to post: the sensors run the task again."""
    import sqlalchemy as sa

    from call_pipeline.crm.database import ensure_pipeline_tables
    from call_pipeline.crm.schema import leads_task_list

    engine = create_crm_engine(crm_url)
    ensure_pipeline_tables(engine)
    now = datetime(2026, 11, 28, 10, 0)
    with engine.begin() as conn:
        conn.execute(leads_task_list.insert(), [
            {"task_id": 1, "leads_id": 1, "call_job_id": "j1", "call_status": "Succeeded", "leads_follow_id": 11,
             "is_interested": 1, "call_task_id": "t1", "recording_url": "u1"},
            {"task_id": 1, "leads_id": 2, "call_job_id": "j2", "call_status": "Succeeded", "leads_follow_id": 12,
             "is_interested": 2, "call_task_id": "t2", "recording_url": "u2"},
        ])
        row_id = conn.execute(sa.select(leads_task_list.c.id).where(leads_task_list.c.leads_id == 1)).scalar_one()
    with engine.connect() as conn:
        assert repo.count_lead_work(conn, [1])[1].work_left == 0
        assert repo.count_lead_work(conn, [1], unposted_hot_leads=True)[1].work_left == 1
    with repo.write_transaction(engine) as conn:
        assert repo.claim_hot_lead(conn, int(row_id), 1, "run-a", now)
    with engine.connect() as conn:
        assert repo.count_lead_work(conn, [1], unposted_hot_leads=True)[1].work_left == 0
