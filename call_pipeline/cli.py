"""`call-pipeline`: the project's command line (demo, UI, Celery worker, simulator, CRM set-up, benchmark)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from call_pipeline.clients.proxies import drop_proxy_variables
from call_pipeline.crm.database import PROJECT_ROOT, CrmTablesExistError, create_crm_engine, create_crm_tables


def _init_db(args: argparse.Namespace) -> int:
    url = args.url or os.environ.get("CALL_PIPELINE_CRM_URL")
    if not url:
        from call_pipeline.crm.database import DEFAULT_CRM_URL

        url = DEFAULT_CRM_URL
    engine = create_crm_engine(url)
    try:
        create_crm_tables(engine, replace=args.replace)
    except CrmTablesExistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    print(f"CRM tables created in {engine.url.render_as_string(hide_password=True)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from call_pipeline.demo import DEMO_DIR, run_demo

    return run_demo(Path(args.data_dir) if args.data_dir else DEMO_DIR)


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def _ui(args: argparse.Namespace) -> int:
    """The demo CRM and the simulator, with `dagster dev` on top: the sensor and the schedule run
    live, and runs, backfills and re-executions can be driven from the UI."""
    from call_pipeline.demo import UI_DIR, demo_job_groups, seed_demo_crm
    from call_pipeline.simulator.scenarios import save_scenario_file

    # A folder of its own: `demo` starts from an empty folder each time, and must not take the
    # UI's CRM, scenario and run history with it.
    ui_dir = Path(args.data_dir) if args.data_dir else UI_DIR
    ui_dir.mkdir(parents=True, exist_ok=True)
    crm_file = ui_dir / "crm.sqlite3"
    scenario_file = ui_dir / "scenario.json"
    crm_url = f"sqlite:///{crm_file}"
    if args.reset or not crm_file.exists() or not scenario_file.exists():
        tasks = seed_demo_crm(crm_url)
        save_scenario_file(scenario_file, demo_job_groups(crm_url, tasks))
    home = ui_dir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")
    env = drop_proxy_variables(dict(os.environ))
    sim_port = args.simulator_port
    env.update({
        "DAGSTER_HOME": str(home),
        "CALL_PIPELINE_CRM_URL": crm_url,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "demo-access-key",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "demo-access-secret",
        "OUTBOUNDBOT_INSTANCE_ID": "demo-instance",
        "OUTBOUNDBOT_ENDPOINT": f"127.0.0.1:{sim_port}",
        "OUTBOUNDBOT_PROTOCOL": "http",
        "DASHSCOPE_API_KEY": "sk-demo",
        "DASHSCOPE_HTTP_BASE_URL": f"http://127.0.0.1:{sim_port}/api/v1",
        "CALL_PIPELINE_SENSOR_INTERVAL_SECONDS": env.get("CALL_PIPELINE_SENSOR_INTERVAL_SECONDS", "120"),
    })
    simulator_cmd = [sys.executable, "-m", "call_pipeline.simulator", "--host", "127.0.0.1",
                     "--port", str(sim_port), "--scenario", str(scenario_file)]
    dagster_cmd = [sys.executable, "-m", "dagster", "dev", "-w", str(PROJECT_ROOT / "workspace.yaml"),
                   "-p", str(args.port), "-h", "127.0.0.1"]
    # SIGTERM (e.g. from a supervisor) must stop the children too, as Ctrl-C does. Each child runs
    # in a process group of its own with SIGINT restored (a shell that starts `ui` in the
    # background has it ignored, and dagster dev would inherit that), so that stopping reaches
    # the webserver, the daemon and the code server that dagster dev starts.
    signal.signal(signal.SIGTERM, _interrupt)
    simulator = _start_group(simulator_cmd, env, PROJECT_ROOT)
    time.sleep(1.0)
    print(f"Dagster UI on http://127.0.0.1:{args.port} (simulator on 127.0.0.1:{sim_port}); Ctrl-C stops both.")
    # from the instance's folder: dagster dev warns about a dagster.yaml in its working folder
    dagster = _start_group(dagster_cmd, env, home)
    try:
        return dagster.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        _stop_groups([dagster, simulator])


def _start_group(command: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, cwd=cwd, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _stop_groups(processes: list[subprocess.Popen], timeout_s: float = 20.0) -> None:
    """SIGINT to each child's whole process group, then SIGKILL to what is left after `timeout_s`."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        while time.monotonic() < deadline and _group_alive(process.pid):
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _worker(args: argparse.Namespace) -> int:
    """A Celery worker for the `celery` executor's steps and the `CeleryRunLauncher`'s runs
    (queue `runs`), on the given queues."""
    from call_pipeline.celery_app import WORKER_QUEUES

    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    unknown = sorted(set(queues) - set(WORKER_QUEUES))
    if not queues or unknown:
        print(f"error: --queues takes some of {', '.join(WORKER_QUEUES)}; got {args.queues!r}", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "celery", "-A", "call_pipeline.celery_app", "worker",
               "-Q", ",".join(queues), "--loglevel", args.loglevel, "--prefetch-multiplier", "1"]
    if args.concurrency:
        command += ["--concurrency", str(args.concurrency)]
    if args.pool:
        command += ["--pool", args.pool]
    if args.name:
        command += ["--hostname", args.name]
    os.execv(sys.executable, command)
    return 0  # pragma: no cover - execv does not return


def _settings(_args: argparse.Namespace) -> int:
    from call_pipeline.resources import RESOURCE_SETTINGS
    from call_pipeline.settings import PipelineSettings, settings_table

    print(settings_table(*RESOURCE_SETTINGS, PipelineSettings))
    return 0


def _simulator(args: argparse.Namespace) -> int:
    from call_pipeline.simulator.__main__ import main as simulator_main

    return simulator_main(args.rest) or 0


def _bench(args: argparse.Namespace) -> int:
    from call_pipeline.bench import main as bench_main

    return bench_main(args.rest) or 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="call-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init-db", help="create the CRM tables in an empty database")
    p.add_argument("--url", help="SQLAlchemy URL (default: CALL_PIPELINE_CRM_URL, else the SQLite default)")
    p.add_argument("--replace", action="store_true", help="drop and recreate existing CRM tables (demo/test only)")
    p.set_defaults(func=_init_db)

    p = sub.add_parser("demo", help="run sync_call_task end to end on a SQLite CRM and the simulator")
    p.add_argument("--data-dir", default=None, help="the demo's folder, emptied first (default: data/demo)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("ui", help="the demo CRM and simulator under `dagster dev`")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--simulator-port", type=int, default=8765)
    p.add_argument("--reset", action="store_true", help="recreate the demo CRM")
    p.add_argument("--data-dir", default=None, help="the UI's folder (default: data/ui)")
    p.set_defaults(func=_ui)

    p = sub.add_parser("worker", help="a Celery worker for the celery executor's steps and the runs queue's runs")
    p.add_argument("--queues", required=True,
                   help="comma-separated: sync_queue, query_queue, download_queue, ai_queue, runs")
    p.add_argument("--concurrency", type=int, default=None, help="worker processes (default: Celery's, the CPUs)")
    p.add_argument("--name", default=None, help="the worker's name (Celery's --hostname, e.g. ai-1@%%h)")
    p.add_argument("--pool", choices=("prefork", "threads", "solo"), default=None,
                   help="Celery's pool (default prefork: a process per slot)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=_worker)

    p = sub.add_parser("settings", help="every setting: its environment variable, default and meaning")
    p.set_defaults(func=_settings)

    p = sub.add_parser("simulator", help="the OutboundBot + DashScope simulator (see --help)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_simulator)

    p = sub.add_parser("bench", help="the performance benchmark (see --help)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench)

    # `simulator` and `bench` hand the rest of the line to their own parsers: argparse's REMAINDER
    # does not take a rest that starts with an option (`bench --leads 50000`).
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("simulator", "bench"):
        args = argparse.Namespace(rest=argv[1:])
        return int((_simulator if argv[0] == "simulator" else _bench)(args) or 0)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())



