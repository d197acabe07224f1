"""The command line: the simulator as a process that the real SDK pages through, CRM set-up,
and the definitions loading as `dagster definitions validate` would."""

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
                                                       protocol="http"))
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


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ui_started_in_the_background_stops_every_process_on_sigterm(tmp_path):
    """As a shell starts it with `&` (SIGINT ignored) and a supervisor stops it (SIGTERM): the
    webserver, the daemon, the code server and the simulator all end, in their own folder."""
    import signal
    import subprocess
    import sys
    import time

    import psutil
    import requests

    port, sim_port = _free_port(), _free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "call_pipeline.cli", "ui", "--port", str(port), "--simulator-port", str(sim_port),
         "--data-dir", str(tmp_path / "ui")],
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert ui.poll() is None, "ui exited"
            try:
                if requests.get(f"http://127.0.0.1:{port}/server_info", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the webserver did not come up"
            time.sleep(0.5)
        time.sleep(3)  # the daemon and the code server are up too
        family = psutil.Process(ui.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in family)
        assert "dagster" in names and "call_pipeline.simulator" in names
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=60)
        gone, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
        assert (tmp_path / "ui" / "crm.sqlite3").exists()
    finally:
        if ui.poll() is None:
            ui.kill()


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
