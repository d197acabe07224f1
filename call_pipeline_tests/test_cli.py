"""The command line: the simulator as a process that the real SDK pages through, CRM set-up,
and the definitions loading as `dagster definitions validate` would."""

import os
import socket
import subprocess
import sys
import time

import dagster as dg
import pytest

from call_pipeline.cli import main
from call_pipeline.clients.outboundbot import OutboundBotClient
from call_pipeline.resources import OutboundBotResource
from call_pipeline.steps.paging import count_job_pages


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_simulator_command_serves_a_1000_job_group_to_the_real_sdk():
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "call_pipeline.cli", "simulator", "--port", str(port), "--demo-jobs", "1000",
         "--job-group-id", "jg-1000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        client = OutboundBotClient(OutboundBotResource(access_key_id="ak", access_key_secret="sk",
                                                       instance_id="inst", endpoint=f"127.0.0.1:{port}",
                                                       protocol="http").client_config())
        pages = count_job_pages(client, "jg-1000", 100)
        job_ids = [job["JobId"] for page in range(1, pages + 1)
                   for job in client.list_jobs_by_group("jg-1000", page, 100)["Jobs"]["List"]]
        assert len(job_ids) == 1000 == len(set(job_ids))
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_init_db_creates_tables_and_refuses_to_touch_existing_ones(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'crm.sqlite3'}"
    assert main(["init-db", "--url", url]) == 0
    assert main(["init-db", "--url", url]) == 1
    assert "refusing" in capsys.readouterr().err
    assert main(["init-db", "--url", url, "--replace"]) == 0


def test_definitions_are_loadable():
    from call_pipeline.definitions import defs

    dg.Definitions.validate_loadable(defs)
    assert {job.name for job in defs.resolve_all_job_defs()} >= {"sync_call_task", "advance_task_states"}


def test_dg_check_defs_finds_and_loads_the_definitions(tmp_path):
    """`dg` (pyproject's [tool.dg]) finds the project's one Definitions without a defs/ folder."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "VIRTUAL_ENV": sys.prefix,
           "CALL_PIPELINE_CRM_URL": f"sqlite:///{tmp_path / 'crm.sqlite3'}"}
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "dg"), "check", "defs"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All definitions loaded successfully" in done.stdout + done.stderr


@pytest.mark.parametrize("command", [["--help"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main(command)
    assert info.value.code == 0
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize(("name", "value"), [("OUTBOUNDBOT_MAX_QPS", "fast"), ("DASHSCOPE_MAX_CONCURRENCY", "0")])
def test_a_bad_limit_setting_is_named(monkeypatch, name, value):
    from call_pipeline.resources import resources_from_env

    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        resources_from_env()


def test_limits_come_from_the_environment(monkeypatch):
    from call_pipeline.resources import resources_from_env

    monkeypatch.setenv("OUTBOUNDBOT_MAX_QPS", "50")
    monkeypatch.setenv("DASHSCOPE_MAX_CONCURRENCY", "16")
    monkeypatch.setenv("DASHSCOPE_MODEL", "qwen-max")
    monkeypatch.setenv("BAILIAN_APP_ID", "app-123")
    resources = resources_from_env()
    assert resources["outboundbot"].max_qps == 50.0
    assert resources["dashscope"].max_concurrency == 16
    assert resources["dashscope"].model == "qwen-max" and resources["dashscope"].app_id == "app-123"


@pytest.mark.slow
def test_ui_started_in_the_background_stops_every_process_on_sigterm(tmp_path):
    """`ui` as a shell starts it with `&` (SIGINT ignored) and a supervisor stops it (SIGTERM), while
    the sensor's runs are under way: the simulator, the webserver, the daemon, their code servers,
    the runs' processes and their forkservers all end before `ui` exits, and the demo's data is in
    the folder it was given."""
    import signal

    from call_pipeline_tests.serve_harness import Served, describe, free_port, wait_until

    port, sim_port = free_port(), free_port()
    data_dir = tmp_path / "ui"
    command = [sys.executable, "-m", "call_pipeline.cli", "ui", "--port", str(port), "--simulator-port",
               str(sim_port), "--data-dir", str(data_dir)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CALL_PIPELINE_SENSOR_TICK_SECONDS": "5"}
    with Served(command, env, tmp_path, data_dir / "dagster_home", ignore_sigint=True) as served:
        served.wait_for_daemon()
        wait_until(lambda: served.running() and any("forkserver" in line for line in served.cmdlines()), 240,
                   "a sensor-launched run's forkserver")
        lines = served.cmdlines()
        assert any("call_pipeline_tools.simulator" in line for line in lines)
        assert any("dagster_webserver" in line for line in lines)
        code, left = served.stop(signal.SIGTERM)
        assert not left, "still running after ui exited:\n" + "\n".join(describe(p) for p in left)
        assert code == 0, served.log()[-4000:]
        assert (data_dir / "crm.sqlite3").exists() and (data_dir / "dagster_home" / "dagster.yaml").exists()
        for port_ in (port, sim_port):
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port_), timeout=1).close()


def test_worker_takes_the_runs_queue_and_a_pool(monkeypatch, capsys):
    """`call-pipeline worker --queues runs` is the run launcher's worker (the production tests start
    it for real); an unknown queue is refused with the list of known ones."""
    from call_pipeline import cli

    started = []
    monkeypatch.setattr(cli.os, "execv", lambda path, argv: started.append(argv))
    assert cli.main(["worker", "--queues", "runs", "--concurrency", "4", "--pool", "threads"]) == 0
    argv = started[0]
    assert argv[argv.index("-Q") + 1] == "runs" and argv[argv.index("--pool") + 1] == "threads"
    assert cli.main(["worker", "--queues", "runs,nosuch"]) == 2
    assert "runs" in capsys.readouterr().err
