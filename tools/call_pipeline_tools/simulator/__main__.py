"""``python -m call_pipeline_tools.simulator``: run the OutboundBot + DashScope simulator in the foreground.

    python -m call_pipeline_tools.simulator --host 127.0.0.1 --port 8765 \\
        [--scenario FILE] [--from-crm URL --task-id N [--task-id M]] [--demo-jobs N --job-group-id jg-demo]

Runs until SIGINT/SIGTERM. Control it over HTTP at ``/__sim/...`` (see ``server``'s docstring).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError

from call_pipeline_tools.simulator import scenarios
from call_pipeline_tools.simulator.server import start_simulator
from call_pipeline_tools.simulator.state import SimulatorState


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m call_pipeline_tools.simulator",
                                description="Local simulator of Alibaba Cloud OutboundBot and DashScope.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--scenario", action="append", default=[], metavar="FILE",
                   help='JSON file {"job_groups": [...]} to load (repeatable)')
    p.add_argument("--from-crm", metavar="URL", help="SQLAlchemy URL of the CRM to build job groups from")
    p.add_argument("--task-id", type=int, action="append", default=[], metavar="N",
                   help="call_tasks.id to build a job group for (with --from-crm; repeatable)")
    p.add_argument("--demo-jobs", type=int, metavar="N", help="build a synthetic group of N jobs (no CRM)")
    p.add_argument("--job-group-id", default="jg-demo", help="id of the --demo-jobs group (default jg-demo)")
    p.add_argument("--seed", type=int, default=None, help="scenario seed (default: the task id, or 0)")
    p.add_argument("--outboundbot-latency-ms", type=float, default=0.0)
    p.add_argument("--dashscope-latency-ms", type=float, default=0.0)
    p.add_argument("--qps-cap", type=int, default=None, help="OutboundBot requests per second before Throttling.User")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (also behind ``call-pipeline simulator``). Returns the exit status."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    if args.task_id and not args.from_crm:
        print("--task-id needs --from-crm URL", file=sys.stderr)
        return 2
    state = SimulatorState()
    loaded: list[str] = []
    try:
        for path in args.scenario:
            for group in scenarios.load_scenario_file(path):
                loaded.append(state.add_job_group(group))
        for task_id in args.task_id:
            seed = args.seed if args.seed is not None else task_id
            try:
                group = scenarios.build_job_group_from_crm(args.from_crm, task_id, seed=seed)
            except ValueError as exc:  # e.g. a task without job_group_id: nothing to simulate for it
                print(f"simulator: skipping task {task_id}: {exc}", file=sys.stderr)
                continue
            loaded.append(state.add_job_group(group))
        if args.demo_jobs:
            group = scenarios.build_demo_job_group(args.job_group_id, args.demo_jobs, seed=args.seed or 0)
            loaded.append(state.add_job_group(group))
    except (OSError, ValueError, SQLAlchemyError) as exc:
        print(f"simulator: cannot load job groups: {exc}", file=sys.stderr)
        return 1
    state.set_latency(args.outboundbot_latency_ms, args.dashscope_latency_ms)
    state.set_qps_cap(args.qps_cap)

    handle = start_simulator(args.host, args.port, state)
    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"Simulator listening on {handle.url}", flush=True)
        print(f"  OutboundBot endpoint (Config.endpoint, protocol=http): {handle.endpoint}", flush=True)
        print(f"  DashScope base URL (DASHSCOPE_HTTP_BASE_URL): {handle.dashscope_base_url}", flush=True)
        for gid in loaded:
            print(f"  job group {gid}: {len(state.jobs_of_group(gid))} jobs", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        handle.stop()
        print("Simulator stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
