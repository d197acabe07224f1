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
import cProfile
import importlib
import io
import json
import multiprocessing
import os
import pstats
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
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")


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
    p.add_argument("--zero-latency", action="store_true",
                   help="no latency and no caps: report leads/s and where the time goes (cProfile)")
    p.add_argument("--no-profile", action="store_true", help="with --zero-latency: measure without cProfile")
    p.add_argument("--executor", choices=("in_process", "multiprocess"), default="in_process",
                   help="in_process: execute_in_process (the job's own executor); multiprocess: the "
                        "multiprocess executor with forkserver and preloaded modules, via execute_job "
                        "(for comparison)")
    p.add_argument("--max-concurrent", type=int, default=4, help="multiprocess: steps at once (4)")
    p.add_argument("--job", metavar="MODULE:FUNCTION",
                   help="run the job that this module-level function returns instead, through execute_job "
                        "with its own executor (for executor comparisons)")
    p.add_argument("--max-runs", type=int, default=3, help="runs (each re-executes the task) until task_type 4")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    return p


# ---- measuring ----------------------------------------------------------------------------------


class DbTimer:
    """Time spent in the CRM database by this process: every statement (before/after_cursor_execute),
    every commit and every connection check (pool_pre_ping), summed over all threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: Counter = Counter()
        self.counts: Counter = Counter()
        # statement time by the repository function that ran it (what to make cheaper)
        self.by_function: Counter = Counter()
        self.function_counts: Counter = Counter()
        # this process's own CPU inside the statements (pymysql encoding and parsing): the rest of
        # their wall time is the server, the network and waiting for the GIL
        self.statement_cpu_seconds = 0.0

    def _add(self, kind: str, seconds: float) -> None:
        with self._lock:
            self.seconds[kind] += seconds
            self.counts[kind] += 1

    def attach(self, engine: sa.Engine) -> None:
        def before(conn, cursor, statement, parameters, context, executemany):
            conn.info.setdefault("_bench_started", []).append((time.perf_counter(), time.thread_time()))

        def after(conn, cursor, statement, parameters, context, executemany):
            started, cpu_started = conn.info["_bench_started"].pop()
            seconds = time.perf_counter() - started
            self._add(statement.lstrip().split(None, 1)[0].upper(), seconds)
            function = repository_caller()
            with self._lock:
                self.by_function[function] += seconds
                self.function_counts[function] += 1
                self.statement_cpu_seconds += time.thread_time() - cpu_started

        sa.event.listen(engine, "before_cursor_execute", before)
        sa.event.listen(engine, "after_cursor_execute", after)
        dialect = engine.dialect
        for name, kind in (("do_commit", "COMMIT"), ("do_rollback", "ROLLBACK"), ("do_ping", "PING")):
            original = getattr(dialect, name)

            def timed(dbapi_connection, _original=original, _kind=kind):
                started = time.perf_counter()
                try:
                    return _original(dbapi_connection)
                finally:
                    self._add(_kind, time.perf_counter() - started)

            setattr(dialect, name, timed)

        if engine.dialect.name in ("mysql", "mariadb"):
            self._attach_server_profiling(engine)

    # ---- server side (MySQL/MariaDB session profiling) ----
    # The client-side figures above include the network and, above all, waiting for the GIL: with
    # 30 busy threads a statement's answer often waits milliseconds before its thread runs again.
    # SHOW PROFILES gives what the server itself spent on each statement of a session (commits
    # and rollbacks included); it keeps the last 100, so each connection's history is read every
    # HARVEST_EVERY statements and when it goes back to the pool.
    HARVEST_EVERY = 40

    def _attach_server_profiling(self, engine: sa.Engine) -> None:
        self.server_seconds: Counter = Counter()
        self.server_counts: Counter = Counter()
        seen: dict[int, list[int]] = {}  # id(DBAPI connection) -> [last Query_ID read, unread count]

        def harvest(dbapi_connection) -> None:
            state = seen.setdefault(id(dbapi_connection), [0, 0])
            try:
                cursor = dbapi_connection.cursor()
                cursor.execute("SHOW PROFILES")
                rows = cursor.fetchall()
                cursor.close()
            except Exception:  # a connection that died is not the benchmark's business
                return
            with self._lock:
                for query_id, duration, query in rows:
                    if query_id > state[0] and not query.upper().startswith(("SET PROFILING", "SHOW PROFILES")):
                        kind = _server_kind(query)
                        self.server_seconds[kind] += float(duration)
                        self.server_counts[kind] += 1
                state[0] = max([state[0], *(row[0] for row in rows)])
                state[1] = 0

        def on_connect(dbapi_connection, record) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("SET profiling = 1, profiling_history_size = 100")
            cursor.close()

        def after(conn, cursor, statement, parameters, context, executemany):
            dbapi_connection = conn.connection.dbapi_connection
            state = seen.setdefault(id(dbapi_connection), [0, 0])
            state[1] += 1
            if state[1] >= self.HARVEST_EVERY:
                harvest(dbapi_connection)

        sa.event.listen(engine, "connect", on_connect)
        sa.event.listen(engine, "checkin", lambda dbapi_connection, record: dbapi_connection is not None
                        and harvest(dbapi_connection))
        sa.event.listen(engine, "after_cursor_execute", after)

    @property
    def server_total(self) -> float | None:
        return sum(self.server_seconds.values()) if hasattr(self, "server_seconds") else None

    def describe_server(self) -> str:
        return ", ".join(f"{kind} {self.server_counts[kind]:,} in {seconds:.2f} s"
                         for kind, seconds in self.server_seconds.most_common())

    CONNECTION_KINDS = ("COMMIT", "ROLLBACK", "PING")

    @property
    def statement_seconds(self) -> float:
        """What the before/after_cursor_execute listener sees: the statements."""
        return sum(v for k, v in self.seconds.items() if k not in self.CONNECTION_KINDS)

    @property
    def connection_seconds(self) -> float:
        """Commits, rollbacks (the pool's reset on return) and pre-pings."""
        return sum(v for k, v in self.seconds.items() if k in self.CONNECTION_KINDS)

    def describe_functions(self, limit: int = 8) -> str:
        return ", ".join(f"{name} {self.function_counts[name]:,} in {seconds:.2f} s"
                         for name, seconds in self.by_function.most_common(limit))

    def describe(self, connection: bool) -> str:
        kinds = [k for k in self.seconds if (k in self.CONNECTION_KINDS) == connection]
        return ", ".join(f"{kind} {self.counts[kind]:,} in {self.seconds[kind]:.2f} s"
                         for kind in sorted(kinds, key=lambda k: -self.seconds[k]))


def _server_kind(query: str) -> str:
    """SELECT / INSERT / COMMIT ...; an UPDATE is named by its first column, which tells the
    pipeline's UPDATEs apart (call_job_id: matching, call_status: results, recording_url,
    leads_follow_id: follow-up links)."""
    words = query.split(None, 4)
    if not words:
        return "?"
    kind = words[0].upper()
    if kind == "UPDATE" and len(words) >= 4 and words[2].upper() == "SET":
        return f"UPDATE {words[3].split('=', 1)[0]}"
    return kind


def repository_caller() -> str:
    """The `call_pipeline.crm.repository` function on the stack (for statement listeners: called
    from an SQLAlchemy event handler, itself called by SQLAlchemy)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__") == "call_pipeline.crm.repository":
            return frame.f_code.co_name
        frame = frame.f_back
    return "(elsewhere)"


def peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def _cpu_profile() -> cProfile.Profile:
    # Each thread's CPU time, not wall time: a worker blocked on a socket, a lock or an idle queue
    # costs nothing, so the figures add up to where the (GIL-bound) process spends its CPU.
    return cProfile.Profile(time.thread_time_ns, 1e-9)


@contextlib.contextmanager
def profile_all_threads() -> Iterator[list[cProfile.Profile]]:
    """cProfile (CPU time) the calling thread and every thread started meanwhile (pool workers
    included)."""
    profiles: list[cProfile.Profile] = []
    original_run = threading.Thread.run

    def run(self):
        profile = _cpu_profile()
        profiles.append(profile)
        profile.enable()
        try:
            original_run(self)
        finally:
            profile.disable()

    main = _cpu_profile()
    profiles.append(main)
    threading.Thread.run = run
    main.enable()
    try:
        yield profiles
    finally:
        main.disable()
        threading.Thread.run = original_run


def profile_top(profiles: list[cProfile.Profile], sort: str, limit: int = 10) -> str:
    stats: pstats.Stats | None = None
    for profile in profiles:
        # a thread still running (an idle pool worker) is left out rather than stopped from here
        with contextlib.suppress(Exception):
            if stats is None:
                stats = pstats.Stats(profile, stream=io.StringIO())
            else:
                stats.add(profile)
    if stats is None:
        return "(no profile)"
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats(sort).print_stats(limit)
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("ncalls")), 0)
    return "\n".join(line.rstrip() for line in lines[start:] if line.strip())


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


def multiprocess_sync_job():
    """`sync_call_task` on the multiprocess executor (for the executor comparison); reconstructable."""
    import dagster as dg

    from call_pipeline.definitions import defs

    return defs.resolve_job_def("sync_call_task").with_executor_def(dg.multiprocess_executor)


@dataclass
class RunFigures:
    run_id: str
    success: bool
    wall: float
    steps: int = 0
    step_seconds: float = 0.0
    step_kinds: Counter = field(default_factory=Counter)
    failed_steps: list[str] = field(default_factory=list)


def _step_figures(run_id: str, success: bool, wall: float, events) -> RunFigures:
    figures = RunFigures(run_id, success, wall)
    for event in events:
        kind = event.event_type_value
        if kind == "STEP_SUCCESS":
            figures.steps += 1
            figures.step_seconds += event.event_specific_data.duration_ms / 1000
            figures.step_kinds[event.step_key.split("[")[0]] += 1
        elif kind == "STEP_FAILURE":
            figures.steps += 1
            figures.failed_steps.append(event.step_key)
    return figures


def run_task(instance, task_id: int, args: argparse.Namespace) -> RunFigures:
    import dagster as dg

    from call_pipeline.definitions import defs

    # Dagster's console logger prints every event; the events still go to the instance as usual.
    run_config: dict = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    paging = {k: v for k, v in (("page_size", args.page_size), ("pages_per_batch", args.pages_per_batch)) if v}
    if paging:
        run_config["ops"] = {"list_job_pages": {"config": paging}}
    started = time.perf_counter()
    if args.job:
        module_name, _, function_name = args.job.partition(":")
        factory = getattr(importlib.import_module(module_name), function_name)
        with dg.execute_job(dg.reconstructable(factory), instance=instance, run_config=run_config,
                            tags={"dagster/partition": str(task_id)}, raise_on_error=False) as result:
            wall = time.perf_counter() - started
            return _step_figures(result.run_id, result.success, wall, result.all_events)
    if args.executor == "in_process":
        job = defs.resolve_job_def("sync_call_task")
        result = job.execute_in_process(instance=instance, partition_key=str(task_id), run_config=run_config,
                                        raise_on_error=False)
        wall = time.perf_counter() - started
        return _step_figures(result.run_id, result.success, wall, result.all_events)
    run_config["execution"] = {"config": {
        "max_concurrent": args.max_concurrent,
        "start_method": {"forkserver": {"preload_modules": ["call_pipeline.definitions"]}},
    }}
    with dg.execute_job(dg.reconstructable(multiprocess_sync_job), instance=instance, run_config=run_config,
                        tags={"dagster/partition": str(task_id)}, raise_on_error=False) as result:
        wall = time.perf_counter() - started
        return _step_figures(result.run_id, result.success, wall, result.all_events)


# ---- the benchmark ------------------------------------------------------------------------------


def _shares(args: argparse.Namespace) -> dict:
    shares = {"succeeded": args.succeeded, "failed": args.failed, "cancelled": args.cancelled,
              "no_transcript": args.no_transcript}
    if any(v < 0 for v in shares.values()) or abs(sum(shares.values()) - 1) > 1e-6:
        raise SystemExit(f"the outcome shares must be non-negative and add up to 1, got {shares}")
    return shares


def _environment(crm_url: str, simulator: SimulatorProcess, args: argparse.Namespace, workdir: str,
                 max_qps: float) -> None:
    for name in PROXY_VARIABLES:
        os.environ.pop(name, None)
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
    figures: dict = {"leads": args.leads, "db": args.db, "executor": args.job or args.executor, "shares": shares,
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
            print(f"simulator: OutboundBot {args.outboundbot_latency_ms:g} ms/call, cap "
                  f"{qps_cap or 'none'} req/s; LLM {args.llm_latency_ms:g} ms/call; pipeline "
                  f"OUTBOUNDBOT_MAX_QPS={os.environ['OUTBOUNDBOT_MAX_QPS']}, "
                  f"DASHSCOPE_MAX_CONCURRENCY={args.llm_concurrency}; executor {args.job or args.executor}; "
                  f"set-up {time.perf_counter() - setup_started:.1f} s", flush=True)

            import dagster as dg

            from call_pipeline import steps
            from call_pipeline.crm.database import get_crm_engine

            timer = DbTimer()
            timer.attach(get_crm_engine(crm_url))
            os.makedirs(os.path.join(workdir, "dagster_home"))
            runs: list[RunFigures] = []
            profiles: list[cProfile.Profile] = []
            profiling = args.zero_latency and not args.no_profile
            home = os.path.join(workdir, "dagster_home")
            with dg.DagsterInstance.local_temp(tempdir=home, overrides={"telemetry": {"enabled": False}}) as instance:
                instance.add_dynamic_partitions("call_tasks", [str(task_id)])
                with profile_all_threads() if profiling else contextlib.nullcontext([]) as profiles:
                    for _ in range(max(1, args.max_runs)):
                        run = run_task(instance, task_id, args)
                        runs.append(run)
                        outcome = task_outcome(crm_url, task_id)
                        print(f"run {run.run_id[:8]}: {'success' if run.success else 'FAILED'} in {run.wall:.1f} s; "
                              f"task_type {outcome['task_type']}"
                              + (f"; failed steps: {', '.join(run.failed_steps[:5])}" if run.failed_steps else ""),
                              flush=True)
                        if outcome["task_type"] == 4:
                            break
                    shutdown = getattr(steps, "shutdown_background_work", None)
                    if shutdown is not None:
                        shutdown()
            stats = simulator.stats()
            simulator.stop()
            report(args, figures, runs, outcome, stats, timer, profiles, qps_cap)
    finally:
        if simulator is not None:
            simulator.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(figures, handle, ensure_ascii=False, indent=1, default=str)
    ok = outcome["task_type"] == 4 and outcome["with_follow_up"] == outcome["matched"] == args.leads
    return 0 if ok else 1


def report(args, figures: dict, runs: list[RunFigures], outcome: dict, stats: dict, timer: DbTimer,
           profiles: list[cProfile.Profile], qps_cap: int | None) -> None:
    wall = sum(run.wall for run in runs)
    steps = sum(run.steps for run in runs)
    step_seconds = sum(run.step_seconds for run in runs)
    kinds: Counter = Counter()
    for run in runs:
        kinds.update(run.step_kinds)
    calls = dict(sorted(stats["requests"].items()))
    figures.update({
        "runs": len(runs), "wall_s": round(wall, 2), "outcome": outcome, "calls": calls,
        "llm_calls": stats["dashscope_requests"], "outboundbot_calls": stats["outboundbot_requests"],
        "throttled": stats["throttled"], "max_outboundbot_requests_in_any_1s": stats["max_requests_in_any_1s"],
        "max_llm_in_flight": stats["max_llm_in_flight"], "db_seconds": round(timer.statement_seconds, 2),
        "db_connection_seconds": round(timer.connection_seconds, 2),
        "db": {k: {"count": timer.counts[k], "seconds": round(timer.seconds[k], 3)} for k in timer.seconds},
        "steps": steps, "step_seconds": round(step_seconds, 2), "step_kinds": dict(kinds),
        "peak_rss_mib": round(peak_rss_mib(), 1), "simulator_peak_rss_mib": round(stats["peak_rss_mib"], 1),
    })
    print()
    print(f"leads: {args.leads:,}; runs: {len(runs)}; task_type {outcome['task_type']}; "
          f"matched {outcome['matched']:,}; follow-ups {outcome['with_follow_up']:,}; "
          f"recordings {outcome['recordings']:,}")
    print(f"wall time: {wall:.1f} s")
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
        note = "" if args.no_profile else " (under cProfile; --no-profile for the plain figure)"
        print(f"throughput: {args.leads / wall:,.0f} leads/s{note}")
    print("calls per API action: " + ", ".join(f"{k} {v:,}" for k, v in calls.items())
          + f"; DashScope {stats['dashscope_requests']:,}; throttled {stats['throttled']:,}; "
          f"max OutboundBot requests in any 1 s {stats['max_requests_in_any_1s']}; "
          f"max LLM calls in flight {stats['max_llm_in_flight']}")
    print(f"database time (statements, summed over threads): {timer.statement_seconds:.2f} s "
          f"({timer.describe(connection=False)}); commits, pool resets and pings: "
          f"{timer.connection_seconds:.2f} s ({timer.describe(connection=True)})")
    print(f"  by repository function: {timer.describe_functions()}")
    print(f"  of which this process's CPU (driver encoding and parsing): {timer.statement_cpu_seconds:.2f} s")
    figures["db_statement_cpu_seconds"] = round(timer.statement_cpu_seconds, 3)
    if timer.server_total is not None:
        print(f"database time on the server (SHOW PROFILES, every statement incl. commits): "
              f"{timer.server_total:.2f} s ({timer.describe_server()})")
        figures["db_server_seconds"] = round(timer.server_total, 3)
        figures["db_server"] = {k: {"count": timer.server_counts[k], "seconds": round(v, 3)}
                                for k, v in timer.server_seconds.items()}
    figures["db_by_function"] = {k: {"count": timer.function_counts[k], "seconds": round(v, 3)}
                                 for k, v in timer.by_function.items()}
    overhead = (wall - step_seconds) / steps if steps else 0.0
    print(f"dagster: {steps:,} steps ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}); "
          f"step time {step_seconds:.1f} s; wall minus step time per step {overhead * 1000:.0f} ms")
    figures["step_overhead_ms"] = round(overhead * 1000, 1)
    print(f"peak memory (RSS): pipeline {peak_rss_mib():.0f} MiB; simulator process {stats['peak_rss_mib']:.0f} MiB")
    if profiles:
        print("\nwhere the CPU time goes, all threads (cProfile on thread CPU time, top 10 by tottime):")
        print(profile_top(profiles, "tottime"))
        print("\ntop 10 by cumulative time:")
        print(profile_top(profiles, "cumulative"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
