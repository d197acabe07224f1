"""The failure-alert sensor against a local HTTP server, in every format: a failed run of a task
posts one alert naming the task, the step and the error, with no secret and no full phone."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import pytest

from call_pipeline.sensors import failure_alert_sensor
from call_pipeline.settings import settings
from call_pipeline_tests.pipeline_harness import (
    TEST_ACCESS_KEY_SECRET,
    create_task,
    project_instance_for_test,
    run_sync,
)


@pytest.fixture
def webhook():
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            received.append(json.loads(body))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"errcode": 0}')

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


@pytest.mark.parametrize("fmt", ["json", "dingtalk", "wecom", "feishu", "slack"])
def test_a_failed_run_posts_one_alert(mariadb_url, simulator, webhook, monkeypatch, fmt):
    url, received = webhook
    monkeypatch.setattr(settings(), "alert_webhook_url", url)
    monkeypatch.setattr(settings(), "alert_format", fmt)
    monkeypatch.setattr(settings(), "ui_base_url", "http://dagster.internal:3000")
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", TEST_ACCESS_KEY_SECRET)
    task_id = create_task(mariadb_url, name="双十一到店邀约", job_group_id="jg-alert",
                          leads=[{"leads_id": 1, "leads_phone": "13800138000"}])
    # the cloud fails for good, and says a phone number in its error
    simulator.state.inject_fault(action="ListJobsByGroup", status=400, code="InvalidParameter", times=None,
                                 message="bad contact 13800138000")
    with project_instance_for_test() as instance:
        result = run_sync(mariadb_url, simulator, task_id, instance)
        assert not result.success
        run = instance.get_run_by_id(result.run_id)
        failure = next(r for r in instance.all_logs(result.run_id)
                       if r.dagster_event and r.dagster_event.event_type_value == "PIPELINE_FAILURE")
        context = dg.build_run_status_sensor_context(
            sensor_name=failure_alert_sensor.name, dagster_event=failure.dagster_event, dagster_instance=instance,
            dagster_run=run).for_run_failure()
        failure_alert_sensor(context)
    assert len(received) == 1
    text = json.dumps(received[0], ensure_ascii=False)
    assert str(task_id) in text and "双十一到店邀约" in text and "list_job_pages" in text
    assert f"http://dagster.internal:3000/runs/{result.run_id}" in text and "InvalidParameter" in text
    assert "13800138000" not in text and "138****8000" in text
    assert TEST_ACCESS_KEY_SECRET not in text
