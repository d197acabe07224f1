"""`call-pipeline bench`: run `sync_call_task` for one large call task against the simulator with
realistic latency and rate limits, and report how close the run came to the limit the cloud allows.

    call-pipeline bench                      # 10,000 leads, SQLite, 30 ms OutboundBot, 500 ms LLM
    call-pipeline bench --db mariadb         # the CRM on MariaDB (a database of its own, dropped after)
    call-pipeline bench --zero-latency       # no latency, no caps: leads/s and the cProfile top 10
    call-pipeline bench --leads 50000 --zero-latency
    call-pipeline bench --db mariadb --tasks 20 --leads 500 --executor celery --workers 2
                                             # 20 tasks at once, launched through a real dagster-daemon

With --tasks N > 1, every task has its own job group; a dagster-daemon on the benchmark's instance
(the queued run coordinator with room for N runs, at most one per task) runs call_task_sensor,
which launches one run per task and relaunches a task whose run left work. The wall time is
counted from the first run's launch until every task is at task_type 4 (also printed: from the
daemon's start), and T is the bound of all the tasks together: the account's limits are shared.

The bound the cloud allows is T = max(OutboundBot calls / rate cap, LLM calls x LLM latency / LLM
concurrency), with the calls counted by the simulator. The simulator runs in a child process (as the
cloud would: its CPU and memory are not the pipeline's), and the CRM database, the Dagster instance
and the limiter files are fresh and temporary for each benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter

from call_pipeline_tools.bench.cloud import UNLIMITED_QPS, SimulatorProcess
from call_pipeline_tools.bench.crm import JOB_GROUP_ID, crm_database, needed_calls, seed_task, task_outcome
from call_pipeline_tools.bench.daemon import run_many
from call_pipeline_tools.bench.environment import daemon_environment, fresh_dagster_home, pipeline_environment
from call_pipeline_tools.bench.measuring import ManyFigures, RunFigures, mariadb_statement_counts
from call_pipeline_tools.bench.report import report, total_outcome
from call_pipeline_tools.bench.running import celery_workers, launch_run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="call-pipeline bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--leads", type=int, default=10_000, help="leads (and jobs) in the task (default 10,000)")
    p.add_argument("--succeeded", type=float, default=0.60, help="share Succeeded with a transcript (0.60)")
    p.add_argument("--failed", type=float, default=0.30, help="share Failed (0.30)")
    p.add_argument("--cancelled", type=float, default=0.05, help="share Cancelled (0.05)")
    p.add_argument("--no-transcript", type=float, default=0.05,
                   help="share Succeeded without a transcript (0.05)")
    p.add_argument("--outboundbot-latency-ms", type=float, default=30.0, help="per OutboundBot call (30)")
    p.add_argument("--llm-latency-ms", type=float, default=500.0, help="per LLM call (500)")
    p.add_argument("--qps-cap", type=int, default=50,
                   help="OutboundBot requests/s the simulator allows; OUTBOUNDBOT_MAX_QPS is set to match (50)")
    p.add_argument("--llm-concurrency", type=int, default=16, help="DASHSCOPE_MAX_CONCURRENCY (16)")
    p.add_argument("--page-size", type=int, default=None,
                   help="ListJobsByGroup page size (default: the pipeline's setting, 100)")
    p.add_argument("--pages-per-batch", type=int, default=None,
                   help="pages per mapped chain, the fan-out granularity (default: the pipeline's setting)")
    p.add_argument("--db", choices=("sqlite", "mariadb"), default="sqlite")
    p.add_argument("--zero-latency", action="store_true", help="no latency and no caps: report leads/s")
    p.add_argument("--executor", choices=("multiprocess", "in_process", "celery"), default=None,
                   help="CALL_PIPELINE_EXECUTOR for the launched run (default: the pipeline's default)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="multiprocess: CALL_PIPELINE_MAX_CONCURRENT_STEPS (default: the pipeline's setting)")
    p.add_argument("--per-queue", type=int, default=None,
                   help="multiprocess: CALL_PIPELINE_MAX_CONCURRENT_STEPS_PER_QUEUE (default: the setting)")
    p.add_argument("--workers", type=int, default=1, help="celery: local workers on every queue (1)")
    p.add_argument("--worker-concurrency", type=int, default=4, help="celery: each worker's --concurrency (4)")
    p.add_argument("--archive", action="store_true",
                   help="archive the recordings (CALL_PIPELINE_RECORDING_STORE, a folder of the benchmark's)")
    p.add_argument("--timeline", action="store_true", help="print when each step was launched, started and ended")
    p.add_argument("--max-runs", type=int, default=3,
                   help="--tasks 1: runs (each re-executes the task) until task_type 4 (with more tasks the "
                        "sensor relaunches a task itself)")
    p.add_argument("--tasks", type=int, default=1,
                   help="call tasks of --leads leads each, each its own job group, all at once; more than 1: "
                        "launched through a real dagster-daemon (call_task_sensor, the run queue); "
                        "1 (default): one run launched directly, no daemon")
    p.add_argument("--instance", choices=("sqlite", "mysql"), default=None,
                   help="--tasks > 1: the Dagster instance's storage, sqlite (the project's dagster.yaml) or "
                        "mysql (deploy/dagster.yaml's, a database of its own on the bench's MariaDB, dropped "
                        "after); default: mysql with --db mariadb, else sqlite")
    p.add_argument("--sensor-tick", type=int, default=2,
                   help="--tasks > 1: CALL_PIPELINE_SENSOR_TICK_SECONDS of the daemon's sensors (2)")
    p.add_argument("--dequeue-threads", type=int, default=0,
                   help="--tasks > 1: the run queue launches this many runs at once (dequeue_use_threads); "
                        "0 (default): one at a time, as deploy/dagster.yaml does. Each launch waits until its "
                        "run process has loaded the project, within the daemon's 60 s gRPC timeout: 8 at "
                        "once on two busy cores timed out and failed runs")
    p.add_argument("--stall-seconds", type=float, default=120.0,
                   help="--tasks > 1: stop and report when some task is not at 4, no run is queued or "
                        "running and nothing changed for this long (120)")
    p.add_argument("--keep", action="store_true",
                   help="keep the benchmark's folder (the daemon's log, the instance's files) and print where")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="--tasks > 1: give up when the tasks are not all done after this many seconds (3600)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--lasting-fault", metavar="ACTION", default=None,
                   help="the cloud answers ACTION (e.g. ListJobs) with 503 for good: prints how long the run "
                        "takes to fail, at the op retries' settings (one run, no daemon)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    return p


def _shares(args: argparse.Namespace) -> dict:
    shares = {"succeeded": args.succeeded, "failed": args.failed, "cancelled": args.cancelled,
              "no_transcript": args.no_transcript}
    if any(v < 0 for v in shares.values()) or abs(sum(shares.values()) - 1) > 1e-6:
        raise SystemExit(f"the outcome shares must be non-negative and add up to 1, got {shares}")
    return shares


def main(argv: list[str] | None = None) -> int:
    if argv and "--live" in argv:
        from call_pipeline_tools.bench.live import main as live

        return live(argv)
    if argv and "--sensor-hour" in argv:
        from call_pipeline_tools.bench.sensor_hour import main as sensor_hour

        return sensor_hour(argv)
    args = build_parser().parse_args(argv)
    shares = _shares(args)
    if args.tasks < 1:
        raise SystemExit(f"--tasks must be at least 1, got {args.tasks}")
    many = args.tasks > 1
    if args.zero_latency:
        args.outboundbot_latency_ms = args.llm_latency_ms = 0.0
    qps_cap = None if args.zero_latency else args.qps_cap
    workdir = tempfile.mkdtemp(prefix="call_pipeline_bench_")
    figures: dict = {"leads": args.leads, "db": args.db, "shares": shares,
                     "zero_latency": args.zero_latency, "outboundbot_latency_ms": args.outboundbot_latency_ms,
                     "llm_latency_ms": args.llm_latency_ms, "qps_cap": qps_cap,
                     "llm_concurrency": args.llm_concurrency, "page_size": args.page_size,
                     "pages_per_batch": args.pages_per_batch}
    if many:
        figures["tasks"] = args.tasks
    simulator: SimulatorProcess | None = None
    # SIGTERM ends the benchmark as Ctrl-C does: through the clean-ups below (the daemon, the
    # workers, the simulator, the databases)
    previous_sigterm = signal.signal(signal.SIGTERM, _terminate)
    try:
        with crm_database(args.db, workdir) as crm_url, contextlib.ExitStack() as stack:
            what = f"{args.tasks} tasks of {args.leads:,} leads" if many else f"{args.leads:,} leads"
            print(f"call_pipeline bench: {what}, CRM on {args.db}; outcomes "
                  + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()), flush=True)
            setup_started = time.perf_counter()
            if many:
                task_ids = [seed_task(crm_url, args.leads, f"{JOB_GROUP_ID}-{n + 1}", n * args.leads, f" #{n + 1}")
                            for n in range(args.tasks)]
            else:
                task_ids = [seed_task(crm_url, args.leads)]
            simulator = SimulatorProcess(crm_url, task_ids, shares, args.seed, args.outboundbot_latency_ms,
                                         args.llm_latency_ms, qps_cap)
            pipeline_environment(crm_url, simulator, args, workdir, UNLIMITED_QPS if qps_cap is None else qps_cap)
            home = fresh_dagster_home(workdir)
            os.environ["DAGSTER_HOME"] = home
            if many:
                figures.update(daemon_environment(args, home, stack))

            from call_pipeline.settings import settings

            executor = settings().executor
            figures["executor"] = executor
            if executor == "multiprocess":
                figures.update(max_concurrent=settings().max_concurrent_steps,
                               per_queue=settings().max_concurrent_steps_per_queue)
            _print_setup(args, figures, executor, qps_cap, time.perf_counter() - setup_started)
            statements_before = mariadb_statement_counts(crm_url) if args.db == "mariadb" else None
            many_figures: ManyFigures | None = None
            if many:
                many_figures = run_many(args, task_ids, crm_url, workdir, home, executor)
                runs = many_figures.runs
            else:
                runs, outcome = _run_one_task(args, simulator, crm_url, task_ids[0], executor, home)
            statements = None
            if statements_before is not None:
                statements = mariadb_statement_counts(crm_url)
                statements.subtract(statements_before)
            stats = simulator.stats()
            simulator.stop()
            if args.archive:
                stored = [os.path.getsize(os.path.join(folder, name))
                          for folder, _, names in os.walk(os.path.join(workdir, "recordings")) for name in names]
                figures["archived"] = {"recordings": len(stored), "bytes": sum(stored)}
            if many:
                outcomes = {tid: task_outcome(crm_url, tid) for tid in task_ids}
                needed = Counter()
                for tid in task_ids:
                    needed.update(needed_calls(crm_url, tid))
                report(args, figures, runs, total_outcome(outcomes), stats, dict(needed), statements, qps_cap,
                       many=many_figures)
            else:
                outcomes = {task_ids[0]: outcome}
                report(args, figures, runs, outcome, stats, needed_calls(crm_url, task_ids[0]), statements, qps_cap)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        if simulator is not None:
            simulator.stop()
        if args.keep:
            print(f"the benchmark's folder is kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(figures, handle, ensure_ascii=False, indent=1, default=str)
    ok = all(o["task_type"] == 4 and o["with_follow_up"] == o["matched"] == args.leads for o in outcomes.values())
    return 0 if ok else 1


def _print_setup(args: argparse.Namespace, figures: dict, executor: str, qps_cap: int | None,
                 setup_s: float) -> None:
    from call_pipeline.settings import settings

    print(f"simulator: OutboundBot {args.outboundbot_latency_ms:g} ms/call, cap "
          f"{qps_cap or 'none'} req/s; LLM {args.llm_latency_ms:g} ms/call; pipeline "
          f"OUTBOUNDBOT_MAX_QPS={os.environ['OUTBOUNDBOT_MAX_QPS']}, "
          f"DASHSCOPE_MAX_CONCURRENCY={args.llm_concurrency}; executor {executor}"
          + (f" (max_concurrent {settings().max_concurrent_steps}, per queue "
             f"{settings().max_concurrent_steps_per_queue})" if executor == "multiprocess" else "")
          + f"; set-up {setup_s:.1f} s", flush=True)
    if args.tasks > 1:
        print(f"daemon: instance on {figures['instance']} (max_concurrent_runs "
              f"{figures['max_concurrent_runs']}, one run per task at a time), sensor tick "
              f"{args.sensor_tick} s, run queue dequeued every 1 s, "
              + (f"{args.dequeue_threads} launches at once" if args.dequeue_threads > 0 else
                 "one launch at a time")
              + (f"; Celery on a RabbitMQ vhost of its own ({figures['celery_vhost']}), "
                 f"{args.workers} worker(s) x concurrency {args.worker_concurrency} on every queue"
                 if executor == "celery" and figures.get("celery_vhost") else
                 f"; Celery: {args.workers} worker(s) x concurrency {args.worker_concurrency} on every "
                 "queue" if executor == "celery" else ""), flush=True)


def _run_one_task(args: argparse.Namespace, simulator: SimulatorProcess, crm_url: str, task_id: int,
                  executor: str, home: str) -> tuple[list[RunFigures], dict]:
    """--tasks 1: runs launched directly, no daemon, until the task is at task_type 4 (at most
    --max-runs); the runs' figures and the task's outcome after the last."""
    import dagster as dg

    from call_pipeline.settings import settings

    run_config: dict = {}
    paging = {k: v for k, v in (("page_size", args.page_size), ("pages_per_batch", args.pages_per_batch)) if v}
    if paging:
        run_config["ops"] = {"list_job_pages": {"config": paging}}
    if args.lasting_fault:
        simulator.inject_fault({"action": args.lasting_fault, "status": 503,
                                "code": "ServiceUnavailable", "times": None})
        args.max_runs = 1
        print(f"lasting fault: {args.lasting_fault} answers 503 for good; op retries "
              f"{settings().op_max_retries}, first delay {settings().op_retry_delay_seconds} s", flush=True)
    runs: list[RunFigures] = []
    with dg.DagsterInstance.get() as instance, \
            celery_workers(args.workers if executor == "celery" else 0, args.worker_concurrency,
                           home) as workers:
        instance.add_dynamic_partitions("call_tasks", [str(task_id)])
        for _ in range(max(1, args.max_runs)):
            run = launch_run(instance, task_id, run_config, workers)
            runs.append(run)
            outcome = task_outcome(crm_url, task_id)
            print(f"run {run.run_id[:8]}: {'success' if run.success else 'FAILED'} in {run.wall:.1f} s; "
                  f"task_type {outcome['task_type']}"
                  + (f"; failed steps: {', '.join(run.failed_steps[:5])}" if run.failed_steps else ""),
                  flush=True)
            if outcome["task_type"] == 4:
                break
    return runs, outcome


def _terminate(signum, frame) -> None:
    print(f"call_pipeline bench: signal {signum}, stopping what the benchmark started", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
