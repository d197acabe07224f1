"""``python -m call_pipeline_tools.simulator`` runs in the foreground and stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import requests

from call_pipeline_tools.simulator import scenarios
from call_pipeline_tools.simulator.__main__ import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_runs_demo_and_scenario_groups_until_sigterm(tmp_path):
    scenario = tmp_path / "scenario.json"
    scenarios.save_scenario_file(scenario, [scenarios.build_demo_job_group("jg-file", 7)])
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "call_pipeline_tools.simulator", "--port", str(port), "--demo-jobs", "25",
         "--job-group-id", "jg-cli", "--scenario", str(scenario)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline()
        assert first.strip() == f"Simulator listening on http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                groups = requests.get(f"http://127.0.0.1:{port}/__sim/job_groups", timeout=2).json()
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert {(g["JobGroupId"], g["jobs"]) for g in groups["job_groups"]} == {("jg-file", 7), ("jg-cli", 25)}
        resp = requests.post(f"http://127.0.0.1:{port}/?JobGroupId=jg-cli&PageNumber=1&PageSize=100",
                             headers={"x-acs-action": "ListJobsByGroup"}, timeout=2)
        assert json.loads(resp.content)["Jobs"]["TotalCount"] == 25
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_task_id_without_crm_is_a_usage_error(capsys):
    assert main(["--task-id", "3"]) == 2
    assert "--from-crm" in capsys.readouterr().err
