"""`call-pipeline`: the project's command line (demo, UI, serve, Celery worker, simulator, CRM set-up, benchmark)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

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


def _tool(command: str, module: str, attribute: str) -> Callable[..., int | None] | None:
    """`demo`, `ui`, `simulator` and `bench` live in call_pipeline_tools, a distribution of its own
    that call_pipeline's wheel leaves out: imported when one of them runs; None, after saying how to
    install it, when it is not installed (rather than a traceback)."""
    try:
        return getattr(importlib.import_module(module), attribute)
    except ModuleNotFoundError as exc:
        if exc.name != "call_pipeline_tools":
            raise
    print(f"error: `call-pipeline {command}` needs the call_pipeline_tools package, which is not installed: "
          "`pip install -e tools` in the project's checkout (./run.sh setup does)", file=sys.stderr)
    return None


def _demo(args: argparse.Namespace) -> int:
    run_demo = _tool("demo", "call_pipeline_tools.demo", "run_demo")
    if run_demo is None:
        return 2
    # under the current folder: an installed package has no writable folder of its own
    return run_demo(Path(args.data_dir) if args.data_dir else Path.cwd() / "data" / "demo")


def _ui(args: argparse.Namespace) -> int:
    """The demo CRM and the simulator, with `serve` on top (call_pipeline_tools/ui.py)."""
    run_ui = _tool("ui", "call_pipeline_tools.ui", "run_ui")
    if run_ui is None:
        return 2
    return run_ui(Path(args.data_dir) if args.data_dir else None, port=args.port,
                  simulator_port=args.simulator_port, reset=args.reset)


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
    simulator_main = _tool("simulator", "call_pipeline_tools.simulator.__main__", "main")
    if simulator_main is None:
        return 2
    return simulator_main(args.rest) or 0


def _bench(args: argparse.Namespace) -> int:
    bench_main = _tool("bench", "call_pipeline_tools.bench.cli", "main")
    if bench_main is None:
        return 2
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



