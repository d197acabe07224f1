"""`call-pipeline bench`: run `sync_call_task` for one large call task against the simulator with
realistic latency and rate limits, and report how close the run came to the limit the cloud allows.

    call-pipeline bench                      # 10,000 leads, SQLite, 30 ms OutboundBot, 500 ms LLM
    call-pipeline bench --db mariadb         # the CRM on MariaDB (a database of its own, dropped after)
    call-pipeline bench --zero-latency       # no latency, no caps: leads/s and the cProfile top 10
    call-pipeline bench --leads 50000 --zero-latency

The bound the cloud allows is T = max(OutboundBot calls / rate cap, LLM calls x LLM latency / LLM
concurrency), with the calls counted by the simulator. The simulator runs in a child process (as the
cloud would: its CPU and memory are not the pipeline's), and the CRM database, the Dagster instance
and the limiter files are fresh and temporary for each benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import resource
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa

MARIADB_SERVER_URL = os.environ.get("CALL_PIPELINE_BENCH_MYSQL_URL", "mysql+pymysql://root:@127.0.0.1:3306")
ORGANIZATION_ID = 77
JOB_GROUP_ID = "jg-bench"
UNLIMITED_QPS = 1_000_000


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
    p.add_argument("--max-runs", type=int, default=3, help="runs (each re-executes the task) until task_type 4")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    return p


# ---- measuring ----------------------------------------------------------------------------------


class ProcessTreeMemory:
    """Peak memory of a process and all its descendants (step processes, the forkserver, Celery
    workers' children), sampled: the peak of the summed RSS, and of the summed PSS (each shared
    page counted once across the processes: what the tree really occupies)."""

    def __init__(self, pids: list[int], every_s: float = 0.25) -> None:
        self.pids, self.every_s = pids, every_s
        self.peak_rss = self.peak_pss = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)

    def __enter__(self) -> ProcessTreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        import psutil

        processes = []
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                processes += [root, *root.children(recursive=True)]
        rss = pss = 0
        for process in processes:
            with contextlib.suppress(psutil.Error):
                info = process.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, len(processes))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()


def mariadb_statement_counts(url: str) -> Counter:
    """The server's statement counters (every client's: the benchmark's database is the only busy one)."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SHOW GLOBAL STATUS WHERE Variable_name IN "
                                    "('Com_select', 'Com_insert', 'Com_update', 'Com_delete', 'Com_commit')"))
        counts = Counter({name[4:].upper(): int(value) for name, value in rows})
    engine.dispose()
    return counts


def peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


# ---- the CRM ------------------------------------------------------------------------------------


@contextlib.contextmanager
def crm_database(kind: str, workdir: str) -> Iterator[str]:
    """A fresh CRM: a SQLite file in the work folder, or a utf8mb4 MariaDB database of its own
    that is dropped afterwards."""
    from call_pipeline.crm.database import create_crm_engine, create_crm_tables

    if kind == "sqlite":
        url = f"sqlite:///{os.path.join(workdir, 'crm.sqlite3')}"
        engine = create_crm_engine(url)
        create_crm_tables(engine)
        engine.dispose()
        yield url
        return
    name = f"call_pipeline_bench_{uuid.uuid4().hex[:10]}"
    server = sa.create_engine(MARIADB_SERVER_URL, isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"))
    try:
        url = f"{MARIADB_SERVER_URL}/{name}?charset=utf8mb4"
        engine = create_crm_engine(url)
        create_crm_tables(engine)
        engine.dispose()
        yield url
    finally:
        from call_pipeline.crm.database import dispose_crm_engines

        dispose_crm_engines()
        with server.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
        server.dispose()


def seed_task(url: str, leads: int) -> int:
    """One call task at task_type 2 with `leads` leads, each with a reference id and a phone."""
    from call_pipeline.crm.database import create_crm_engine
    from call_pipeline.crm.schema import call_tasks, leads_task_list

    engine = create_crm_engine(url)
    now = datetime.now().replace(microsecond=0)
    with engine.begin() as conn:
        task_id = int(conn.execute(call_tasks.insert().values(
            task_name=f"基准测试 {leads} 条线索", organization_id=ORGANIZATION_ID, task_type=2,
            job_group_id=JOB_GROUP_ID, created_time=now, updated_time=now)).inserted_primary_key[0])
        chunk = 2_000
        for start in range(0, leads, chunk):
            rows = []
            for n in range(start, min(leads, start + chunk)):
                leads_id = 1_000_000 + n
                rows.append({"task_id": task_id, "leads_id": leads_id, "organization_id": ORGANIZATION_ID,
                             "leads_phone": f"13{n % 10}{n:08d}",
                             "reference_id": f"{task_id}{ORGANIZATION_ID}{leads_id}"})
            conn.execute(leads_task_list.insert(), rows)
    engine.dispose()
    return task_id


def task_outcome(url: str, task_id: int) -> dict:
    from call_pipeline.crm.database import create_crm_engine
    from call_pipeline.crm.schema import call_tasks, dcc_leads_follow
    from call_pipeline.crm.schema import leads_task_list as L

    engine = create_crm_engine(url)
    with engine.connect() as conn:
        task_type = conn.execute(sa.select(call_tasks.c.task_type).where(call_tasks.c.id == task_id)).scalar()
        row = conn.execute(sa.select(
            sa.func.count(L.c.call_job_id), sa.func.count(L.c.leads_follow_id), sa.func.count(L.c.recording_url),
        ).where(L.c.task_id == task_id)).one()
        follows = conn.execute(sa.select(sa.func.count()).select_from(dcc_leads_follow)).scalar()
    engine.dispose()
    return {"task_type": task_type, "matched": row[0], "with_follow_up": row[1], "recordings": row[2],
            "follow_up_rows": follows}


# ---- the simulator, in a child process ------------------------------------------------------------


def _serve_simulator(pipe, crm_url: str, task_id: int, shares: dict, seed: int,
                     outboundbot_ms: float, llm_ms: float, qps_cap: int | None) -> None:
    from call_pipeline.simulator.scenarios import build_job_group_from_crm
    from call_pipeline.simulator.server import SimulatorState, start_simulator

    mix = {"Succeeded": shares["succeeded"] + shares["no_transcript"], "Failed": shares["failed"],
           "Cancelled": shares["cancelled"]}
    group = build_job_group_from_crm(crm_url, task_id, status_mix={k: v for k, v in mix.items() if v > 0},
                                     seed=seed)
    succeeded = [job for job in group["jobs"] if job["Status"] == "Succeeded" and job.get("Tasks")]
    random.Random(seed).shuffle(succeeded)
    for job in succeeded[:round(shares["no_transcript"] * len(group["jobs"]))]:
        job["Tasks"][-1]["Conversation"] = []
    state = SimulatorState(seed=seed)
    state.add_job_group(group)
    del group, succeeded
    state.set_latency(outboundbot_ms, llm_ms)
    state.set_qps_cap(qps_cap)
    handle = start_simulator(state=state)
    pipe.send({"endpoint": handle.endpoint, "dashscope_base_url": handle.dashscope_base_url})
    try:
        while True:
            message = pipe.recv()
            if message == "stats":
                stats = state.stats()
                stats.pop("per_second", None)
                stats["peak_rss_mib"] = peak_rss_mib()
                pipe.send(stats)
            elif message == "stop":
                break
    finally:
        handle.stop()


class SimulatorProcess:
    def __init__(self, crm_url: str, task_id: int, shares: dict, seed: int, outboundbot_ms: float,
                 llm_ms: float, qps_cap: int | None) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._process = context.Process(
            target=_serve_simulator, name="bench-simulator", daemon=True,
            args=(child, crm_url, task_id, shares, seed, outboundbot_ms, llm_ms, qps_cap))
        self._process.start()
        if not self._pipe.poll(600):
            self.stop()
            raise RuntimeError("the simulator did not start")
        info = self._pipe.recv()
        self.endpoint: str = info["endpoint"]
        self.dashscope_base_url: str = info["dashscope_base_url"]

    def stats(self) -> dict:
        self._pipe.send("stats")
        return self._pipe.recv()

    def stop(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError, BrokenPipeError):
                self._pipe.send("stop")
            self._process.join(timeout=20)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()


# ---- running the job ----------------------------------------------------------------------------


@dataclass
class RunFigures:
    run_id: str
    success: bool
    wall: float
    steps: int = 0
    step_seconds: float = 0.0
    step_kinds: Counter = field(default_factory=Counter)
    failed_steps: list[str] = field(default_factory=list)
    first_step_s: float = 0.0  # from the launch to the first step's start
    peak_rss: int = 0
    peak_pss: int = 0
    peak_processes: int = 0
    timeline: list[tuple[float, str, str]] = field(default_factory=list)  # (s from launch, event, step)


def _step_figures(figures: RunFigures, entries, launched_at: float) -> RunFigures:
    starts = []
    for entry in entries:
        event = entry.dagster_event
        if event is None:
            continue
        kind = event.event_type_value
        if event.step_key and kind in ("STEP_WORKER_STARTING", "STEP_START", "STEP_SUCCESS", "STEP_FAILURE"):
            figures.timeline.append((entry.timestamp - launched_at, kind, event.step_key))
        if kind == "STEP_START":
            starts.append(entry.timestamp)
        elif kind == "STEP_SUCCESS":
            figures.steps += 1
            figures.step_seconds += event.event_specific_data.duration_ms / 1000
            figures.step_kinds[event.step_key.split("[")[0]] += 1
        elif kind == "STEP_FAILURE":
            figures.steps += 1
            figures.failed_steps.append(event.step_key)
    if starts:
        figures.first_step_s = min(starts) - launched_at
    return figures


def launch_run(instance, task_id: int, run_config: dict, workers: list[int]) -> RunFigures:
    """One run of `sync_call_task` for the task, launched as the daemon's run launcher does: the
    run is created in the instance, and `dagster api execute_run` executes it in a process of its
    own, on the job's own executor."""
    import subprocess

    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._grpc.types import ExecuteRunArgs
    from dagster_shared.serdes import serialize_value

    recon_job = ReconstructableRepository.for_module(
        "call_pipeline.definitions", "defs", working_directory=os.getcwd()).get_reconstructable_job("sync_call_task")
    run = instance.create_run_for_job(job_def=recon_job.get_definition(), run_config=run_config,
                                      tags={"dagster/partition": str(task_id)},
                                      job_code_origin=recon_job.get_python_origin())
    args = ExecuteRunArgs(job_origin=recon_job.get_python_origin(), run_id=run.run_id,
                          instance_ref=instance.get_ref(), set_exit_code_on_failure=True)
    launched_at = time.time()
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "dagster", "api", "execute_run", serialize_value(args)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with ProcessTreeMemory([process.pid, *workers]) as memory:
        process.wait()
    wall = time.perf_counter() - started
    finished = instance.get_run_by_id(run.run_id)
    figures = RunFigures(run.run_id, finished.status.value == "SUCCESS", wall, peak_rss=memory.peak_rss,
                         peak_pss=memory.peak_pss, peak_processes=memory.peak_processes)
    return _step_figures(figures, instance.all_logs(run.run_id), launched_at)


@contextlib.contextmanager
def celery_workers(count: int, concurrency: int, home: str) -> Iterator[list[int]]:
    """`count` local Celery workers on every queue (`call-pipeline worker`), stopped after."""
    import subprocess

    if count <= 0:
        yield []
        return
    processes = []
    try:
        for n in range(count):
            name = f"bench-{n}-{uuid.uuid4().hex[:6]}@%h"
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "call_pipeline.cli", "worker", "--queues",
                 "sync_queue,query_queue,download_queue,ai_queue", "--concurrency", str(concurrency),
                 "--name", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, "DAGSTER_HOME": home}))
        wait_for_workers(len(processes))
        yield [p.pid for p in processes]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except Exception:
                process.kill()


def wait_for_workers(count: int, timeout_s: float = 90.0) -> None:
    from call_pipeline.celery_app import app

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=1.0) or []
        if len(replies) >= count:
            return
    raise RuntimeError(f"{count} Celery worker(s) did not answer within {timeout_s:.0f} s")


# ---- the benchmark ------------------------------------------------------------------------------


def _shares(args: argparse.Namespace) -> dict:
    shares = {"succeeded": args.succeeded, "failed": args.failed, "cancelled": args.cancelled,
              "no_transcript": args.no_transcript}
    if any(v < 0 for v in shares.values()) or abs(sum(shares.values()) - 1) > 1e-6:
        raise SystemExit(f"the outcome shares must be non-negative and add up to 1, got {shares}")
    return shares


def _environment(crm_url: str, simulator: SimulatorProcess, args: argparse.Namespace, workdir: str,
                 max_qps: float) -> None:
    from call_pipeline.clients.proxies import drop_proxy_variables

    drop_proxy_variables()
    os.environ.update({
        "CALL_PIPELINE_CRM_URL": crm_url,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "bench-access-key",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "bench-access-secret",
        "OUTBOUNDBOT_INSTANCE_ID": "bench-instance",
        "OUTBOUNDBOT_ENDPOINT": simulator.endpoint,
        "OUTBOUNDBOT_PROTOCOL": "http",
        "DASHSCOPE_API_KEY": "sk-bench",
        "DASHSCOPE_HTTP_BASE_URL": simulator.dashscope_base_url,
        "OUTBOUNDBOT_MAX_QPS": str(max_qps),
        "DASHSCOPE_MAX_CONCURRENCY": str(args.llm_concurrency),
        "CALL_PIPELINE_STATE_DIR": os.path.join(workdir, "limits"),
        # nothing should fail; if something does, the benchmark should say so, not back off for minutes
        "CALL_PIPELINE_OP_RETRY_DELAY_SECONDS": os.environ.get("CALL_PIPELINE_OP_RETRY_DELAY_SECONDS", "1"),
    })
    if args.archive:
        os.environ["CALL_PIPELINE_RECORDING_STORE"] = f"file://{os.path.join(workdir, 'recordings')}"
    for name, value in (("CALL_PIPELINE_EXECUTOR", args.executor),
                        ("CALL_PIPELINE_MAX_CONCURRENT_STEPS", args.max_concurrent),
                        ("CALL_PIPELINE_MAX_CONCURRENT_STEPS_PER_QUEUE", args.per_queue)):
        if value is not None:
            os.environ[name] = str(value)


def _dagster_home(workdir: str) -> str:
    """A Dagster home configured like the project's (its dagster.yaml: pools, run limits)."""
    home = os.path.join(workdir, "dagster_home")
    os.makedirs(home)
    project_yaml = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dagster.yaml")
    if os.path.exists(project_yaml):
        shutil.copy(project_yaml, os.path.join(home, "dagster.yaml"))
    extra = os.environ.get("CALL_PIPELINE_BENCH_EXTRA_YAML")  # an experiment's instance settings
    if extra:
        with open(os.path.join(home, "dagster.yaml"), "a", encoding="utf-8") as out, open(extra) as add:
            out.write("\n" + add.read())
    return home


def needed_calls(url: str, task_id: int) -> dict:
    """What a clean run must call, from the CRM: LLM calls (leads whose follow-up the LLM writes)
    and DownloadRecording calls (succeeded calls with an attempt)."""
    from call_pipeline.crm.database import create_crm_engine
    from call_pipeline.crm.schema import leads_task_list as L
    from call_pipeline.domain.followups import plan_follow_up

    engine = create_crm_engine(url)
    llm = recordings = 0
    with engine.connect() as conn:
        for status, conversation, call_task_id in conn.execute(
                sa.select(L.c.call_status, L.c.call_conversation, L.c.call_task_id).where(L.c.task_id == task_id)):
            llm += plan_follow_up(status, conversation) == "llm"
            recordings += status == "Succeeded" and bool(call_task_id)
    engine.dispose()
    return {"llm": llm, "recordings": recordings}


def bound_seconds(stats: dict, qps_cap: int, llm_latency_s: float, llm_concurrency: int) -> tuple[float, float]:
    """(OutboundBot calls / cap, LLM calls x latency / concurrency), from the simulator's counts."""
    return stats["outboundbot_requests"] / qps_cap, stats["dashscope_requests"] * llm_latency_s / llm_concurrency


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shares = _shares(args)
    if args.zero_latency:
        args.outboundbot_latency_ms = args.llm_latency_ms = 0.0
    qps_cap = None if args.zero_latency else args.qps_cap
    workdir = tempfile.mkdtemp(prefix="call_pipeline_bench_")
    figures: dict = {"leads": args.leads, "db": args.db, "shares": shares,
                     "zero_latency": args.zero_latency, "outboundbot_latency_ms": args.outboundbot_latency_ms,
                     "llm_latency_ms": args.llm_latency_ms, "qps_cap": qps_cap,
                     "llm_concurrency": args.llm_concurrency, "page_size": args.page_size,
                     "pages_per_batch": args.pages_per_batch}
    simulator: SimulatorProcess | None = None
    try:
        with crm_database(args.db, workdir) as crm_url:
            print(f"call_pipeline bench: {args.leads:,} leads, CRM on {args.db}; outcomes "
                  + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()), flush=True)
            setup_started = time.perf_counter()
            task_id = seed_task(crm_url, args.leads)
            simulator = SimulatorProcess(crm_url, task_id, shares, args.seed, args.outboundbot_latency_ms,
                                         args.llm_latency_ms, qps_cap)
            _environment(crm_url, simulator, args, workdir, UNLIMITED_QPS if qps_cap is None else qps_cap)
            home = _dagster_home(workdir)
            os.environ["DAGSTER_HOME"] = home

            import dagster as dg

            from call_pipeline import settings

            executor = settings.EXECUTOR
            figures["executor"] = executor
            if executor == "multiprocess":
                figures.update(max_concurrent=settings.MAX_CONCURRENT_STEPS,
                               per_queue=settings.MAX_CONCURRENT_STEPS_PER_QUEUE)
            print(f"simulator: OutboundBot {args.outboundbot_latency_ms:g} ms/call, cap "
                  f"{qps_cap or 'none'} req/s; LLM {args.llm_latency_ms:g} ms/call; pipeline "
                  f"OUTBOUNDBOT_MAX_QPS={os.environ['OUTBOUNDBOT_MAX_QPS']}, "
                  f"DASHSCOPE_MAX_CONCURRENCY={args.llm_concurrency}; executor {executor}"
                  + (f" (max_concurrent {settings.MAX_CONCURRENT_STEPS}, per queue "
                     f"{settings.MAX_CONCURRENT_STEPS_PER_QUEUE})" if executor == "multiprocess" else "")
                  + f"; set-up {time.perf_counter() - setup_started:.1f} s", flush=True)
            run_config: dict = {}
            paging = {k: v for k, v in (("page_size", args.page_size), ("pages_per_batch", args.pages_per_batch)) if v}
            if paging:
                run_config["ops"] = {"list_job_pages": {"config": paging}}
            statements_before = mariadb_statement_counts(crm_url) if args.db == "mariadb" else None
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
            report(args, figures, runs, outcome, stats, needed_calls(crm_url, task_id), statements, qps_cap)
    finally:
        if simulator is not None:
            simulator.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(figures, handle, ensure_ascii=False, indent=1, default=str)
    ok = outcome["task_type"] == 4 and outcome["with_follow_up"] == outcome["matched"] == args.leads
    return 0 if ok else 1


def report(args, figures: dict, runs: list[RunFigures], outcome: dict, stats: dict, needed: dict,
           statements: Counter | None, qps_cap: int | None) -> None:
    wall = sum(run.wall for run in runs)
    steps = sum(run.steps for run in runs)
    step_seconds = sum(run.step_seconds for run in runs)
    kinds: Counter = Counter()
    for run in runs:
        kinds.update(run.step_kinds)
    calls = dict(sorted(stats["requests"].items()))
    downloads = calls.get("DownloadRecording", 0)
    mib = 1024 * 1024
    figures.update({
        "runs": len(runs), "wall_s": round(wall, 2), "outcome": outcome, "calls": calls,
        "llm_calls": stats["dashscope_requests"], "outboundbot_calls": stats["outboundbot_requests"],
        "llm_calls_needed": needed["llm"], "download_calls_needed": needed["recordings"],
        "llm_repeated": max(0, stats["dashscope_requests"] - needed["llm"]),
        "downloads_repeated": stats["download_recording_repeats"],
        "throttled": stats["throttled"], "max_outboundbot_requests_in_any_1s": stats["max_requests_in_any_1s"],
        "max_llm_in_flight": stats["max_llm_in_flight"],
        "steps": steps, "step_seconds": round(step_seconds, 2), "step_kinds": dict(kinds),
        "first_step_s": round(runs[0].first_step_s, 2) if runs else None,
        "peak_pss_mib": round(max(r.peak_pss for r in runs) / mib, 1),
        "peak_rss_sum_mib": round(max(r.peak_rss for r in runs) / mib, 1),
        "peak_processes": max(r.peak_processes for r in runs),
        "simulator_peak_rss_mib": round(stats["peak_rss_mib"], 1),
    })
    print()
    print(f"leads: {args.leads:,}; runs: {len(runs)}; task_type {outcome['task_type']}; "
          f"matched {outcome['matched']:,}; follow-ups {outcome['with_follow_up']:,}; "
          f"recordings {outcome['recordings']:,}")
    print(f"wall time: {wall:.1f} s (launch to first step {figures['first_step_s']} s)")
    if qps_cap is not None:
        ob_bound, llm_bound = bound_seconds(stats, qps_cap, args.llm_latency_ms / 1000, args.llm_concurrency)
        bound = max(ob_bound, llm_bound)
        figures.update({"bound_s": round(bound, 2), "ratio": round(wall / bound, 3) if bound else None})
        print(f"bound T = max({stats['outboundbot_requests']:,} OutboundBot calls / {qps_cap} per s = "
              f"{ob_bound:.1f} s, {stats['dashscope_requests']:,} LLM calls x {args.llm_latency_ms / 1000:g} s / "
              f"{args.llm_concurrency} = {llm_bound:.1f} s) = {bound:.1f} s")
        print(f"wall / T = {wall / bound:.3f}" if bound else "wall / T: no calls")
    else:
        figures["leads_per_s"] = round(args.leads / wall, 1)
        print(f"throughput: {args.leads / wall:,.0f} leads/s")
    print("calls per API action: " + ", ".join(f"{k} {v:,}" for k, v in calls.items())
          + f"; DashScope {stats['dashscope_requests']:,}; throttled {stats['throttled']:,}; "
          f"max OutboundBot requests in any 1 s {stats['max_requests_in_any_1s']}; "
          f"max LLM calls in flight {stats['max_llm_in_flight']}")
    print(f"calls against the work: LLM {stats['dashscope_requests']:,} for {needed['llm']:,} leads with a "
          f"transcript ({figures['llm_repeated']:,} repeated); DownloadRecording {downloads:,} for "
          f"{needed['recordings']:,} succeeded leads ({figures['downloads_repeated']:,} repeated)")
    if "archived" in figures:
        archived = figures["archived"]
        print(f"archive: {archived['recordings']:,} recordings, {archived['bytes'] / 1e6:.1f} MB; "
              f"{archived['recordings'] / wall:.1f} recordings/s, {archived['bytes'] / wall / 1e6:.2f} MB/s "
              f"over the run's wall time")
    if statements is not None:
        figures["db_statements"] = dict(statements)
        print("database statements (MariaDB server counters): "
              + ", ".join(f"{k} {v:,}" for k, v in sorted(statements.items())))
    overhead = (wall - step_seconds) / steps if steps else 0.0
    print(f"dagster: {steps:,} steps ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}); "
          f"step time {step_seconds:.1f} s, summed")
    figures["step_overhead_ms"] = round(overhead * 1000, 1)
    if args.timeline:
        for run in runs:
            print(f"timeline of run {run.run_id[:8]} (seconds from the launch):")
            for at, kind, step in run.timeline:
                print(f"  {at:7.2f}  {kind:<20} {step}")
    print(f"peak memory of the run's processes ({figures['peak_processes']} at most): "
          f"{figures['peak_pss_mib']:.0f} MiB (PSS, shared pages once), {figures['peak_rss_sum_mib']:.0f} MiB "
          f"(RSS summed); simulator process {stats['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
