"""`call-pipeline`: the project's command line (demo, UI, serve, Celery worker, simulator, CRM set-up, benchmark)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from call_pipeline.clients.proxies import drop_proxy_variables
from call_pipeline.crm.database import CrmTablesExistError, create_crm_engine, create_crm_tables


def _init_db(args: argparse.Namespace) -> int:
    url = args.url or os.environ.get("CALL_PIPELINE_CRM_URL")
    if not url:
        # No default database: tables created in a file nobody reads would look like success.
        print("error: no CRM database given: pass --url or set CALL_PIPELINE_CRM_URL", file=sys.stderr)
        return 2
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
    from call_pipeline.demo import run_demo

    # under the current folder: an installed package has no writable folder of its own
    return run_demo(Path(args.data_dir) if args.data_dir else Path.cwd() / "data" / "demo")


def _ui(args: argparse.Namespace) -> int:
    """The demo CRM and the simulator, with `serve` on top (daemon and webserver): the sensors and
    the schedule run live, and runs, backfills and re-executions can be driven from the UI."""
    from call_pipeline.demo import demo_job_groups, seed_demo_crm
    from call_pipeline.serve import Service, install_instance_yaml, serve
    from call_pipeline.simulator.scenarios import save_scenario_file

    # A folder of its own, under the current one (never inside the installed package): `demo`
    # starts from an empty folder each time, and must not take the UI's CRM, scenario and run
    # history with it.
    ui_dir = (Path(args.data_dir) if args.data_dir else Path.cwd() / "data" / "ui").resolve()
    ui_dir.mkdir(parents=True, exist_ok=True)
    crm_file = ui_dir / "crm.sqlite3"
    scenario_file = ui_dir / "scenario.json"
    crm_url = f"sqlite:///{crm_file}"
    if args.reset or not crm_file.exists() or not scenario_file.exists():
        tasks = seed_demo_crm(crm_url)
        save_scenario_file(scenario_file, demo_job_groups(crm_url, tasks))
    home = ui_dir / "dagster_home"
    install_instance_yaml(home)
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
    simulator = Service("simulator", (sys.executable, "-m", "call_pipeline.simulator", "--host", "127.0.0.1",
                                      "--port", str(sim_port), "--scenario", str(scenario_file)), port=sim_port)
    print(f"The demo: simulator on 127.0.0.1:{sim_port}, CRM and Dagster home in {ui_dir}", flush=True)
    return serve(ui=True, host="127.0.0.1", port=args.port, data_dir=ui_dir, env=env, before=[simulator])


def _serve(args: argparse.Namespace) -> int:
    """Everything one machine runs for the sensors, the schedule and the runs (call_pipeline/serve.py)."""
    from call_pipeline.serve import serve

    return serve(ui=not args.no_ui, host=args.host, port=args.port,
                 data_dir=Path(args.data_dir) if args.data_dir else Path.cwd() / "data")


def _worker(args: argparse.Namespace) -> int:
    """A Celery worker for the `celery` executor's steps and the `CeleryRunLauncher`'s runs
    (queue `runs`), on the given queues."""
    from call_pipeline.queues import WORKER_QUEUES

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
    p.add_argument("--url", help="SQLAlchemy URL (default: CALL_PIPELINE_CRM_URL; one of the two is required)")
    p.add_argument("--replace", action="store_true", help="drop and recreate existing CRM tables (demo/test only)")
    p.set_defaults(func=_init_db)

    p = sub.add_parser("demo", help="run sync_call_task end to end on a SQLite CRM and the simulator")
    p.add_argument("--data-dir", default=None,
                   help="the demo's folder, emptied first (default: data/demo under the current one)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("ui", help="the demo CRM and simulator under `serve` (daemon and webserver)")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--simulator-port", type=int, default=8765)
    p.add_argument("--reset", action="store_true", help="recreate the demo CRM")
    p.add_argument("--data-dir", default=None, help="the UI's folder (default: data/ui under the current one)")
    p.set_defaults(func=_ui)

    p = sub.add_parser("serve", help="the daemon, the webserver and the Celery workers the instance needs, "
                                     "on this machine; SIGTERM or Ctrl-C stops them all")
    p.add_argument("--no-ui", action="store_true", help="no webserver (another machine serves the UI)")
    p.add_argument("--host", default="127.0.0.1", help="the webserver's address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=3000, help="the webserver's port (default: 3000)")
    p.add_argument("--data-dir", default=None,
                   help="DAGSTER_HOME unset: the instance is DATA_DIR/dagster_home, with the project's "
                        "dagster.yaml (default: data under the current folder)")
    p.set_defaults(func=_serve)

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



