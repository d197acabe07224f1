"""`call-pipeline serve`: what it starts for an instance and its settings (a plan, read from the
instance's dagster.yaml and the environment), and, as real processes on a SQLite CRM and the
simulator, that a signal stops every process of its tree and that one process dying stops the rest."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from call_pipeline.cli import main
from call_pipeline.crm.database import PROJECT_ROOT
from call_pipeline.queues import RUNS_QUEUE
from call_pipeline.serve import (
    CODE_LOCATION,
    DEFAULT_RUN_SLOTS,
    ServeError,
    celery_run_queue,
    packaged_instance_yaml,
    plan_services,
    resolve_home,
    write_workspace,
)
from call_pipeline_tests.serve_harness import Served, alive, describe, free_port, wait_until

READY = re.compile(r"\b(steps|runs\d*)@\S+ ready\.")
CELERY_LAUNCHER = {"module": "dagster_celery.launcher", "class": "CeleryRunLauncher",
                   "config": {"default_queue": "runs"}}


def _commands(services) -> dict[str, tuple[str, ...]]:
    return {service.name: service.command for service in services}


WORKSPACE = Path("/run/serve/workspace.yaml")


def _plan(config: dict, env: dict, *, ui: bool = False, host: str = "h", port: int = 1, cpus: int = 1):
    return plan_services(config, env, ui=ui, host=host, port=port, code_port=4266, workspace=WORKSPACE, cpus=cpus)


# -- the plan ----------------------------------------------------------------------------------


def test_one_machine_runs_one_code_server_for_the_daemon_and_the_webserver():
    services = _commands(_plan({}, {}, ui=True, host="10.0.0.5", port=3001))
    assert list(services) == ["code server", "dagster-daemon", "dagster-webserver"]
    code, daemon, webserver = services["code server"], services["dagster-daemon"], services["dagster-webserver"]
    assert code[1:5] == ("-m", "dagster", "code-server", "start")
    # a module of the installed package, never a workspace.yaml inside a checkout
    assert code[5:9] == ("-m", "call_pipeline.definitions", "-a", "defs")
    assert code[code.index("--location-name") + 1] == CODE_LOCATION == "call_pipeline.definitions:defs"
    assert code[code.index("-p") + 1] == "4266"
    assert daemon[1:] == ("-m", "call_pipeline.daemon", "run", "-w", str(WORKSPACE))
    assert webserver[1:] == ("-m", "dagster_webserver", "-w", str(WORKSPACE), "-h", "10.0.0.5", "-p", "3001")
    for command in (code, daemon, webserver):
        assert command[0] == sys.executable
    assert list(_commands(_plan({}, {}, ui=False, host="127.0.0.1", port=3000))) == ["code server", "dagster-daemon"]


def test_without_the_ui_the_code_server_is_a_plain_grpc_server():
    """Nothing can ask for a reload without the UI: the same location, served without Dagster's
    reloadable proxy (which pings its server every second)."""
    with_ui = _commands(_plan({}, {}, ui=True))["code server"]
    headless = _commands(_plan({}, {}, ui=False))["code server"]
    assert headless[1:5] == ("-m", "dagster", "api", "grpc")
    assert headless[5:] == with_ui[5:]


def test_the_workspace_names_the_code_server_under_the_modules_own_location_name(tmp_path):
    """The sensors' and the schedule's state is kept under the location's name: the name Dagster
    gives the module when it loads it itself (`dagster dev`, the repository's workspace.yaml)."""
    from dagster._core.workspace.load import location_origin_from_module_name

    written = yaml.safe_load(write_workspace(tmp_path / "workspace.yaml", 4266).read_text(encoding="utf-8"))
    assert written == {"load_from": [{"grpc_server": {"host": "127.0.0.1", "port": 4266,
                                                      "location_name": CODE_LOCATION}}]}
    assert location_origin_from_module_name("call_pipeline.definitions", "defs", None).location_name == CODE_LOCATION


def test_the_celery_executor_brings_a_worker_on_the_step_queues():
    services = _commands(_plan({}, {"CALL_PIPELINE_EXECUTOR": "celery"}, ui=False, host="h", port=1))
    assert list(services) == ["step worker", "code server", "dagster-daemon"]
    worker = services["step worker"]
    assert worker[1:4] == ("-m", "call_pipeline.cli", "worker")
    assert worker[worker.index("--queues") + 1] == "sync_queue,query_queue,download_queue,ai_queue"
    for executor in ("multiprocess", "in_process"):
        names = _commands(_plan({}, {"CALL_PIPELINE_EXECUTOR": executor}, ui=False, host="h", port=1))
        assert "step worker" not in names


@pytest.mark.parametrize("launcher", [CELERY_LAUNCHER, {**CELERY_LAUNCHER, "module": "call_pipeline.instance",
                                                       "class": "PipelineCeleryRunLauncher"}],
                         ids=["dagster-celery's", "the production instance's"])
def test_a_celery_run_launcher_brings_a_worker_on_its_queue(launcher):
    services = _commands(_plan({"run_launcher": launcher}, {}, ui=False, host="h", port=1))
    assert list(services) == ["run worker", "code server", "dagster-daemon"]
    worker = services["run worker"]
    assert worker[worker.index("--queues") + 1] == RUNS_QUEUE
    # runs side by side on threads, as many as the instance hands over at once
    assert worker[worker.index("--pool") + 1] == "threads"
    assert worker[worker.index("--concurrency") + 1] == str(DEFAULT_RUN_SLOTS)
    bounded = _commands(_plan({"run_launcher": launcher, "concurrency": {"runs": {"max_concurrent_runs": 30}}}, {},
                              ui=False, host="h", port=1))["run worker"]
    assert bounded[bounded.index("--concurrency") + 1] == "30"
    # one worker per CPU, the threads shared out among them, each worker named apart
    two = _commands(_plan({"run_launcher": launcher, "concurrency": {"runs": {"max_concurrent_runs": 31}}}, {},
                          cpus=2))
    assert list(two) == ["run worker 1", "run worker 2", "code server", "dagster-daemon"]
    assert [c[c.index("--concurrency") + 1] for c in (two["run worker 1"], two["run worker 2"])] == ["16", "16"]
    assert len({c[c.index("--name") + 1] for c in (two["run worker 1"], two["run worker 2"])}) == 2
    # the two workers of one machine have names of their own
    both = _commands(_plan({"run_launcher": CELERY_LAUNCHER}, {"CALL_PIPELINE_EXECUTOR": "celery"}))
    names = {command[command.index("--name") + 1] for command in (both["run worker"], both["step worker"])}
    assert len(names) == 2
    # any other launcher runs runs itself
    other = {"run_launcher": {"module": "dagster", "class": "DefaultRunLauncher"}}
    assert "run worker" not in _commands(_plan(other, {}, ui=False, host="h", port=1))


def test_the_production_instance_runs_as_many_runs_at_once_as_it_hands_over():
    deploy = yaml.safe_load((PROJECT_ROOT / "deploy" / "dagster.yaml").read_text(encoding="utf-8"))
    handed_over = deploy["concurrency"]["runs"]["max_concurrent_runs"]
    workers = _commands(_plan(deploy, {}, ui=False, host="h", port=1, cpus=2))
    threads = [int(c[c.index("--concurrency") + 1]) for name, c in workers.items() if name.startswith("run worker")]
    assert len(threads) == 2 and handed_over <= sum(threads) < handed_over + 2


def test_the_run_queue_is_the_launchers_own_and_may_come_from_the_environment():
    from_env = {"run_launcher": {**CELERY_LAUNCHER, "config": {"default_queue": {"env": "RUN_QUEUE"}}}}
    assert celery_run_queue(from_env, {"RUN_QUEUE": "runs"}) == "runs"
    with pytest.raises(ServeError, match="RUN_QUEUE"):
        celery_run_queue(from_env, {})
    with pytest.raises(ServeError, match="default_queue"):
        celery_run_queue({"run_launcher": {**CELERY_LAUNCHER, "config": {}}}, {})


def test_an_unset_dagster_home_gets_the_projects_dagster_yaml(tmp_path):
    home, made = resolve_home({}, tmp_path / "data")
    assert made and home == (tmp_path / "data" / "dagster_home").resolve()
    assert (home / "dagster.yaml").read_text(encoding="utf-8") == (PROJECT_ROOT / "dagster.yaml").read_text(
        encoding="utf-8") == packaged_instance_yaml()


def test_a_dagster_home_without_its_dagster_yaml_is_refused(tmp_path):
    with pytest.raises(ServeError, match="has no dagster.yaml"):
        resolve_home({"DAGSTER_HOME": str(tmp_path)}, tmp_path / "data")
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    assert resolve_home({"DAGSTER_HOME": str(tmp_path)}, tmp_path / "data") == (tmp_path.resolve(), False)
    # serve's own folder is not made when the operator named the home
    assert not (tmp_path / "data").exists()


def test_the_worker_takes_the_run_queue_and_refuses_an_unknown_one(capsys):
    assert main(["worker", "--queues", "runs,bogus"]) == 2
    err = capsys.readouterr().err
    assert "'runs,bogus'" in err and "runs" in err.split("got")[0]


# -- real processes ----------------------------------------------------------------------------


def _serve_env(crm_url: str, simulator, **extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name != "DAGSTER_HOME"}
    env.update({
        "PYTHONUNBUFFERED": "1",
        "CALL_PIPELINE_CRM_URL": crm_url,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "test-access-key",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "test-access-secret",
        "OUTBOUNDBOT_INSTANCE_ID": "test-instance",
        "OUTBOUNDBOT_ENDPOINT": simulator.endpoint,
        "OUTBOUNDBOT_PROTOCOL": "http",
        "DASHSCOPE_API_KEY": "sk-test",
        "DASHSCOPE_HTTP_BASE_URL": simulator.dashscope_base_url,
        "CALL_PIPELINE_SENSOR_TICK_SECONDS": "5",
        **extra,
    })
    return env


def _serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "call_pipeline.cli", "serve", *args]


def _assert_all_gone(served: Served, code: int, left, expected_code: int = 0) -> None:
    assert not left, "still running after serve exited:\n" + "\n".join(describe(p) for p in left)
    assert code == expected_code, served.log()[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize(("ui", "signum"), [(False, signal.SIGTERM), (True, signal.SIGINT)],
                         ids=["no-ui-SIGTERM", "ui-SIGINT"])
def test_serve_stops_every_process_it_started_on_a_signal(tmp_path, sqlite_url, simulator, ui, signum):
    """DAGSTER_HOME unset: the project's dagster.yaml in a home under the current folder. The
    code server, the daemon (and the webserver) come up, the daemon and the webserver on the one
    code server; the signal, to serve alone, ends all of them before serve exits."""
    port = free_port()
    home = tmp_path / "data" / "dagster_home"
    args = [] if ui else ["--no-ui"]
    with Served(_serve_command(*args, "--port", str(port)), _serve_env(sqlite_url, simulator), tmp_path,
                home) as served:
        served.wait_for_daemon()
        lines = served.cmdlines()
        assert any("call_pipeline.daemon run" in line for line in lines)
        assert (home / "dagster.yaml").read_text(encoding="utf-8") == packaged_instance_yaml()
        if ui:
            wait_until(lambda: served.running() and _server_info(port), 180, "the webserver")
        else:
            assert not any("dagster_webserver" in line for line in lines)
        # one code server (with the UI, Dagster's reloadable proxy and the server it runs; without,
        # the server alone), none spawned by the others
        lines = served.cmdlines()
        assert sum("code-server start" in line for line in lines) == (1 if ui else 0), lines
        assert sum("api grpc" in line for line in lines) == 1, lines
        code, left = served.stop(signum)
        _assert_all_gone(served, code, left)
        assert f"{signal.Signals(signum).name} received" in served.log()


def _server_info(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/server_info", timeout=2).ok
    except requests.RequestException:
        return False


@pytest.mark.slow
def test_when_one_process_dies_serve_stops_the_others_and_fails(tmp_path, sqlite_url, simulator):
    home = tmp_path / "data" / "dagster_home"
    with Served(_serve_command("--no-ui"), _serve_env(sqlite_url, simulator), tmp_path, home) as served:
        served.wait_for_daemon()
        family = served.family()
        daemon = next(p for p in family if "call_pipeline.daemon run" in " ".join(p.cmdline()))
        daemon.kill()
        assert served.process is not None
        code = served.process.wait(timeout=90)
        left = [p for p in family if p.pid != daemon.pid and p.is_running()
                and p.status() != "zombie"]
        _assert_all_gone(served, code, left, expected_code=1)
        assert f"dagster-daemon (pid {daemon.pid}) exited with code -9; stopping the others" in served.log()


@pytest.mark.slow
def test_serve_starts_and_stops_the_celery_workers_the_instance_needs(tmp_path, sqlite_url, simulator):
    """CALL_PIPELINE_EXECUTOR=celery and a CeleryRunLauncher in $DAGSTER_HOME/dagster.yaml: a
    worker on the step queues and one per CPU on the runs queue, each on the machine's RabbitMQ,
    come up beside the daemon, and go with it."""
    home = tmp_path / "home"
    home.mkdir()
    config = yaml.safe_load(packaged_instance_yaml())
    config["run_launcher"] = CELERY_LAUNCHER
    (home / "dagster.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    env = _serve_env(sqlite_url, simulator, DAGSTER_HOME=str(home), CALL_PIPELINE_EXECUTOR="celery")
    with Served(_serve_command("--no-ui"), env, tmp_path, home) as served:
        served.wait_for_daemon()
        # each worker says so once it consumes from the broker
        workers = 1 + (os.cpu_count() or 1)
        wait_until(lambda: served.running() and len(set(READY.findall(served.log()))) == workers, 180,
                   f"the {workers} Celery workers to be ready")
        lines = served.cmdlines()
        assert any("-Q sync_queue,query_queue,download_queue,ai_queue" in line for line in lines), lines
        assert sum(f"-Q {RUNS_QUEUE} " in line and "--pool threads" in line for line in lines) == workers - 1, lines
        assert not (tmp_path / "data").exists()  # the operator's home, not one of serve's own
        code, left = served.stop(signal.SIGTERM)
        _assert_all_gone(served, code, left)


def test_serve_refuses_a_dagster_home_without_dagster_yaml(tmp_path):
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    result = subprocess.run(_serve_command("--no-ui"), env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert f"DAGSTER_HOME={tmp_path} has no dagster.yaml" in result.stderr


def test_the_packaged_instance_is_the_projects(tmp_path):
    assert packaged_instance_yaml() == (PROJECT_ROOT / "dagster.yaml").read_text(encoding="utf-8")
    assert Path(PROJECT_ROOT / "call_pipeline" / "dagster.yaml").resolve() == (PROJECT_ROOT / "dagster.yaml")


# -- the supervisor's stop, on small processes ---------------------------------------------------

STUBBORN = """
import subprocess, sys, time
# it ends on SIGTERM; of its children, one ignores SIGTERM, and one left the process group
subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "time.sleep(600)"])
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print("ready", flush=True)
time.sleep(600)
"""


def test_stop_kills_what_ignores_sigterm_and_what_left_the_group(tmp_path, capsys):
    from call_pipeline.serve import Service, Supervisor

    supervisor = Supervisor([], os.environ, cwd=tmp_path, stop_timeout_s=1.0)
    supervisor._start(Service("stubborn", (sys.executable, "-c", STUBBORN)))
    wait_until(lambda: len(supervisor.processes()) == 3, 30, "the process and its two children")
    tree = supervisor.processes()
    try:
        supervisor.stop()
        left = [describe(proc) for proc in tree if alive(proc)]
        assert not left, left
    finally:
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                proc.kill()
    err = capsys.readouterr().err
    assert "still running 1s after SIGTERM, killed:" in err


SUPERVISED = """
import os, sys
from call_pipeline.serve import Service, Supervisor
sleeper = (sys.executable, "-c", "import time; time.sleep(600)")
services = [Service("sleeper", sleeper), Service("second", (sys.executable, "-c", sys.argv[1]))]
sys.exit(Supervisor(services, os.environ, stop_timeout_s=10).run())
"""
SLEEP = "import time; time.sleep(600)"


def _supervised(tmp_path, second: str) -> Served:
    return Served([sys.executable, "-c", SUPERVISED, second], os.environ, tmp_path, tmp_path / "no-home")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_the_supervisor_stops_its_processes_on_each_stop_signal(tmp_path, signum):
    with _supervised(tmp_path, SLEEP) as served:
        wait_until(lambda: served.running() and len(served.family()) == 3, 30, "the two processes")
        code, left = served.stop(signum)
        _assert_all_gone(served, code, left)
        assert f"{signum.name} received; stopping sleeper, second and what they started" in served.log()


def test_the_supervisor_stops_the_others_and_fails_when_one_ends(tmp_path):
    with _supervised(tmp_path, "import time; time.sleep(2); raise SystemExit(3)") as served:
        wait_until(lambda: served.running() and len(served.family()) == 3, 30, "the two processes")
        family = served.family()
        assert served.process is not None
        code = served.process.wait(timeout=60)
        left = [describe(proc) for proc in family if alive(proc)]
        assert not left and code == 1, (left, served.log())
        assert "second (pid " in served.log() and "exited with code 3; stopping the others" in served.log()


def test_the_processes_of_a_killed_supervisor_are_told_to_stop(tmp_path):
    """serve itself SIGKILLed cannot stop anything: the kernel sends its children SIGTERM."""
    with _supervised(tmp_path, SLEEP) as served:
        wait_until(lambda: served.running() and len(served.family()) == 3, 30, "the two processes")
        children = served.family()[1:]
        assert served.process is not None
        served.process.kill()
        served.process.wait(timeout=10)
        try:
            _gone, left = psutil.wait_procs(children, timeout=10)
            assert not [describe(proc) for proc in left if alive(proc)]
        finally:
            for proc in children:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
