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
import multiprocessing
import os
import random
import resource
import shutil
import signal
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


# ---- measuring ----------------------------------------------------------------------------------


class ProcessTreeMemory:
    """Peak memory of a process and all its descendants (step processes, the forkserver, Celery
    workers' children), sampled: the peak of the summed RSS, and of the summed PSS (each shared
    page counted once across the processes: what the tree really occupies)."""

    def __init__(self, pids: list[int], every_s: float = 0.25, adaptive: bool = False) -> None:
        self.pids, self.every_s = pids, every_s
        # adaptive: wait at least 3 x what a sample took (a tree of a hundred processes on two
        # busy cores must not be measured at the cost of the runs it measures)
        self.adaptive = adaptive
        self.peak_rss = self.peak_pss = 0
        self.peak_processes = 0
        self.seen: dict[int, float] = {}  # pid -> create time, of every process sampled
        # The forkserver's CPU with the step processes it forked and reaped (theirs accrue to it
        # as they end), at the last sample: the run's process does not reap the forkserver, so
        # the run's own rusage misses them.
        self.forkserver_cpu: dict[int, float] = {}
        self._forkservers: dict[int, bool] = {}
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
                self.seen.setdefault(process.pid, process.create_time())
                if process.pid not in self._forkservers:
                    # the server itself, not the step processes forked from it (same command line)
                    self._forkservers[process.pid] = (process.ppid() in self.pids
                                                      and "multiprocessing.forkserver" in " ".join(process.cmdline()))
                if self._forkservers[process.pid]:
                    t = process.cpu_times()
                    self.forkserver_cpu[process.pid] = t.user + t.system + t.children_user + t.children_system
                info = process.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, len(processes))

    def _run(self) -> None:
        wait = self.every_s
        while not self._stop.wait(wait):
            started = time.perf_counter()
            self.sample()
            if self.adaptive:
                wait = max(self.every_s, 3 * (time.perf_counter() - started))


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


def seed_task(url: str, leads: int, job_group_id: str = JOB_GROUP_ID, first_lead: int = 0,
              name_suffix: str = "") -> int:
    """One call task at task_type 2 with `leads` leads, each with a reference id and a phone (lead
    numbers from `first_lead` on: the tasks of one benchmark have leads and phones of their own)."""
    from call_pipeline.crm.database import create_crm_engine
    from call_pipeline.crm.schema import call_tasks, leads_task_list

    engine = create_crm_engine(url)
    now = datetime.now().replace(microsecond=0)
    with engine.begin() as conn:
        task_id = int(conn.execute(call_tasks.insert().values(
            task_name=f"基准测试 {leads} 条线索{name_suffix}", organization_id=ORGANIZATION_ID, task_type=2,
            job_group_id=job_group_id, created_time=now, updated_time=now)).inserted_primary_key[0])
        chunk = 2_000
        for start in range(first_lead, first_lead + leads, chunk):
            rows = []
            for n in range(start, min(first_lead + leads, start + chunk)):
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


def _serve_simulator(pipe, crm_url: str, task_ids: list[int], shares: dict, seed: int,
                     outboundbot_ms: float, llm_ms: float, qps_cap: int | None) -> None:
    from call_pipeline.simulator.scenarios import build_job_group_from_crm
    from call_pipeline.simulator.server import start_simulator
    from call_pipeline.simulator.state import SimulatorState

    # Ctrl-C reaches the whole process group: the benchmark stops the simulator once it has
    # stopped what uses it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    mix = {"Succeeded": shares["succeeded"] + shares["no_transcript"], "Failed": shares["failed"],
           "Cancelled": shares["cancelled"]}
    state = SimulatorState(seed=seed)
    for task_id in task_ids:  # each task its own job group (the task's job_group_id)
        group = build_job_group_from_crm(crm_url, task_id, status_mix={k: v for k, v in mix.items() if v > 0},
                                         seed=seed)
        succeeded = [job for job in group["jobs"] if job["Status"] == "Succeeded" and job.get("Tasks")]
        random.Random(seed).shuffle(succeeded)
        for job in succeeded[:round(shares["no_transcript"] * len(group["jobs"]))]:
            job["Tasks"][-1]["Conversation"] = []
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
    def __init__(self, crm_url: str, task_ids: int | list[int], shares: dict, seed: int, outboundbot_ms: float,
                 llm_ms: float, qps_cap: int | None) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        task_ids = [task_ids] if isinstance(task_ids, int) else list(task_ids)
        self._process = context.Process(
            target=_serve_simulator, name="bench-simulator", daemon=True,
            args=(child, crm_url, task_ids, shares, seed, outboundbot_ms, llm_ms, qps_cap))
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

    def inject_fault(self, fault: dict) -> None:
        import requests

        requests.post(f"http://{self.endpoint}/__sim/faults", json=fault, timeout=10,
                      proxies={"http": "", "https": ""}).raise_for_status()

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
    # from the launch to the exit of the run's process: after the run's end event, the process
    # tears its interpreter down (about 0.9 s with Dagster and the project loaded); the run's slot
    # and its task are free at the end event, so `wall` ends there
    process_exit_s: float | None = None
    # CPU (user + system) of the run's process and every process under it, once all have exited
    # and been reaped: a steadier figure than the wall time on a shared machine
    cpu_s: float | None = None
    peak_rss: int = 0
    peak_pss: int = 0
    peak_processes: int = 0
    timeline: list[tuple[float, str, str]] = field(default_factory=list)  # (s from launch, event, step)
    # --tasks > 1 (runs the daemon launched): seconds from the daemon's start
    task_id: int = 0
    status: str = ""
    queued_at: float | None = None
    launched_at: float | None = None
    ended_at: float | None = None
    parent_run_id: str | None = None


def _step_figures(figures: RunFigures, entries, launched_at: float) -> RunFigures:
    """The run's steps from its event log; `wall` becomes launch to the run's end event."""
    starts = []
    ended = None
    for entry in entries:
        event = entry.dagster_event
        if event is None:
            continue
        kind = event.event_type_value
        if event.step_key and kind in ("STEP_WORKER_STARTING", "STEP_START", "STEP_SUCCESS", "STEP_FAILURE"):
            figures.timeline.append((entry.timestamp - launched_at, kind, event.step_key))
        elif kind in ("PIPELINE_START", "PIPELINE_SUCCESS", "PIPELINE_FAILURE"):
            figures.timeline.append((entry.timestamp - launched_at, kind, "(the run)"))
            if kind != "PIPELINE_START":
                ended = entry.timestamp - launched_at
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
    if ended is not None and figures.process_exit_s is not None:
        figures.wall = ended
    return figures


def launch_run(instance, task_id: int, run_config: dict, workers: list[int]) -> RunFigures:
    """One run of `sync_call_task` for the task, launched as the daemon's run launcher does: the
    run is created in the instance, and `dagster api execute_run` executes it in a process of its
    own, on the job's own executor."""
    import subprocess

    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._grpc.types import ExecuteRunArgs
    from dagster_shared.serdes import serialize_value

    from call_pipeline.run_status import SYNC_JOB_NAME

    recon_job = ReconstructableRepository.for_module(
        "call_pipeline.definitions", "defs", working_directory=os.getcwd()).get_reconstructable_job(SYNC_JOB_NAME)
    run = instance.create_run_for_job(job_def=recon_job.get_definition(), run_config=run_config,
                                      tags={"dagster/partition": str(task_id)},
                                      job_code_origin=recon_job.get_python_origin())
    args = ExecuteRunArgs(job_origin=recon_job.get_python_origin(), run_id=run.run_id,
                          instance_ref=instance.get_ref(), set_exit_code_on_failure=True)
    launched_at = time.time()
    started = time.perf_counter()
    reaped_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen([sys.executable, "-m", "dagster", "api", "execute_run", serialize_value(args)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with ProcessTreeMemory([process.pid, *workers]) as memory:
        process.wait()
    wall = time.perf_counter() - started
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (reaped.ru_utime - reaped_before.ru_utime) + (reaped.ru_stime - reaped_before.ru_stime)
    cpu += sum(memory.forkserver_cpu.values())
    finished = instance.get_run_by_id(run.run_id)
    figures = RunFigures(run.run_id, finished.status.value == "SUCCESS", wall, peak_rss=memory.peak_rss,
                         peak_pss=memory.peak_pss, peak_processes=memory.peak_processes, process_exit_s=wall,
                         cpu_s=cpu)
    figures = _step_figures(figures, instance.all_logs(run.run_id), launched_at)
    figures.timeline.append((wall, "PROCESS_EXIT", "(the run's process)"))
    return figures


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
            # a session of its own: Ctrl-C reaches the benchmark, which stops the workers, and what
            # a worker leaves behind (its pool's children) is killed with its process group
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "call_pipeline.cli", "worker", "--queues",
                 "sync_queue,query_queue,download_queue,ai_queue", "--concurrency", str(concurrency),
                 "--name", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, "DAGSTER_HOME": home}, start_new_session=True))
        wait_for_workers(len(processes))
        yield [p.pid for p in processes]
    finally:
        for process in processes:
            process.terminate()
        deadline = time.monotonic() + 30
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            _kill_group(process)


def wait_for_workers(count: int, timeout_s: float = 90.0) -> None:
    from call_pipeline.celery_app import app

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=1.0) or []
        if len(replies) >= count:
            return
    raise RuntimeError(f"{count} Celery worker(s) did not answer within {timeout_s:.0f} s")


def _kill_group(process) -> None:
    """SIGKILL what is left of the process group that `process` leads (started in a session of its
    own), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        process.wait(timeout=10)


# ---- many tasks, through the daemon ---------------------------------------------------------------



def _project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def mysql_instance_env() -> Iterator[dict[str, str]]:
    """A utf8mb4 database of its own on the bench's MariaDB for the Dagster instance (the variables
    deploy/dagster.yaml reads), dropped afterwards."""
    server_url = sa.engine.make_url(MARIADB_SERVER_URL)
    name = f"call_pipeline_bench_dagster_{uuid.uuid4().hex[:10]}"
    server = sa.create_engine(MARIADB_SERVER_URL, isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"))
    try:
        yield {"DAGSTER_MYSQL_HOST": server_url.host or "127.0.0.1", "DAGSTER_MYSQL_PORT": str(server_url.port or 3306),
               "DAGSTER_MYSQL_USER": server_url.username or "root", "DAGSTER_MYSQL_PASSWORD": server_url.password or "",
               "DAGSTER_MYSQL_DB": name}
    finally:
        with server.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
        server.dispose()


MYSQL_STORAGE = {"mysql": {"mysql_db": {
    "hostname": {"env": "DAGSTER_MYSQL_HOST"}, "port": {"env": "DAGSTER_MYSQL_PORT"},
    "username": {"env": "DAGSTER_MYSQL_USER"}, "password": {"env": "DAGSTER_MYSQL_PASSWORD"},
    "db_name": {"env": "DAGSTER_MYSQL_DB"}}}}


def configure_run_queue(home: str, tasks: int, mysql: bool, dequeue_threads: int = 0) -> dict:
    """The bench's instance for the daemon: the project's dagster.yaml (already in `home`) with the
    queued run coordinator, a dequeue every second, room for every task's run at once (the limit
    of one run per partition stays: the tasks are distinct partitions) and, with `mysql`,
    deploy/dagster.yaml's storage. Returns what it wrote."""
    import yaml

    path = os.path.join(home, "dagster.yaml")
    config: dict = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle) or {}
    if mysql:
        deploy_yaml = os.path.join(_project_root(), "deploy", "dagster.yaml")
        storage = MYSQL_STORAGE
        if os.path.exists(deploy_yaml):
            with open(deploy_yaml, encoding="utf-8") as handle:
                storage = (yaml.safe_load(handle) or {}).get("storage") or MYSQL_STORAGE
        config["storage"] = storage
    coordinator: dict = {"dequeue_interval_seconds": 1}
    if dequeue_threads > 0:
        coordinator.update(dequeue_use_threads=True, dequeue_num_workers=dequeue_threads)
    config["run_coordinator"] = {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator",
                                 "config": coordinator}
    runs = config.setdefault("concurrency", {}).setdefault("runs", {})
    runs["max_concurrent_runs"] = max(tasks, int(runs.get("max_concurrent_runs") or 0))
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle, sort_keys=False, allow_unicode=True)
    return config


def private_vhost() -> tuple[str, str] | None:
    """A RabbitMQ virtual host of the benchmark's own (its queues are nobody else's, and only its
    workers answer the ping), or None when rabbitmqctl is not at hand: (name, broker URL)."""
    import subprocess

    name = f"call_pipeline_bench_{uuid.uuid4().hex[:10]}"
    try:
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", name], check=True, capture_output=True, timeout=60)
        subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
                       check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        delete_vhost(name)
        return None
    return name, f"pyamqp://guest:guest@127.0.0.1:5672/{name}"


def delete_vhost(name: str) -> None:
    import subprocess

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", name], capture_output=True, timeout=60)


class Daemon:
    """`dagster-daemon run` on the bench's instance and a workspace of the project's definitions, in
    a session of its own; its code server, the runs it launches and their step processes are its
    descendants, in its process group. stop() ends them all."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.log_path = os.path.join(workdir, "daemon.log")
        self.process = None
        self.started_at = 0.0

    def start(self) -> None:
        import subprocess

        workspace = os.path.join(self.workdir, "workspace.yaml")
        with open(workspace, "w", encoding="utf-8") as handle:
            handle.write("load_from:\n  - python_module:\n      module_name: call_pipeline.definitions\n"
                         f"      attribute: defs\n      working_directory: {json.dumps(os.getcwd())}\n")
        binary = os.path.join(os.path.dirname(sys.executable), "dagster-daemon")
        command = [binary] if os.path.exists(binary) else [sys.executable, "-m", "dagster._daemon"]
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child holds it; closed below
        try:
            self.started_at = time.time()
            self.process = subprocess.Popen([*command, "run", "-w", workspace], stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()

    def check(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"dagster-daemon exited ({self.process.returncode}):\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError), open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()[-chars:]
        return ""

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(Exception):
            self.process.wait(timeout=30)
        _kill_group(self.process)
        self.process = None


def kill_leftovers(seen: dict[int, float]) -> list[str]:
    """Kill, by pid, any process the memory sampler saw (the daemon's and the workers' trees) that
    is still alive 5 s after they were stopped; returns what was left."""
    import psutil

    processes = []
    for pid, created in seen.items():
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if process.create_time() == created:
                processes.append(process)
    _, alive = psutil.wait_procs(processes, timeout=5)
    left = []
    for process in alive:
        with contextlib.suppress(psutil.Error):
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            left.append(f"{process.pid} {' '.join(process.cmdline())[:100]}")
            process.kill()
    psutil.wait_procs(alive, timeout=5)
    return left


def _run_statuses(runs) -> Counter:
    counts: Counter = Counter()
    for run in runs:
        status = run.status.value
        counts["running" if status in ("STARTING", "STARTED") else "queued" if status in (
            "QUEUED", "NOT_STARTED") else status.lower()] += 1
    return counts


def wait_for_tasks(instance, crm_url: str, task_ids: list[int], daemon: Daemon, timeout_s: float,
                   stall_s: float) -> tuple[dict[int, float], str | None]:
    """Until every task is at task_type 4 and no run of theirs is queued, running or about to be
    retried; or until nothing happened for `stall_s` seconds with no run queued or running while
    some task is not at 4 (the sensor does not relaunch it: stalled). Returns when each task was
    first seen at 4 (the CRM is read every 0.25 s), and what stalled, if it did."""
    import dagster as dg

    from call_pipeline.crm.database import create_crm_engine
    from call_pipeline.crm.schema import call_tasks
    from call_pipeline.run_status import ACTIVE_RUN_STATUSES, SYNC_JOB_NAME, partitions_with_active_runs

    engine = create_crm_engine(crm_url)
    done_at: dict[int, float] = {}
    last_poll = last_print = 0.0
    shown = seen = None
    last_change = time.time()
    try:
        while True:
            now = time.time()
            daemon.check()
            with engine.connect() as conn:
                for task_id, task_type in conn.execute(sa.select(call_tasks.c.id, call_tasks.c.task_type)
                                                       .where(call_tasks.c.id.in_(task_ids))):
                    if task_type == 4 and task_id not in done_at:
                        done_at[task_id] = now
            if now - last_poll >= 1.0:
                last_poll = now
                runs = instance.get_runs(filters=dg.RunsFilter(job_name=SYNC_JOB_NAME))
                counts = _run_statuses(runs)
                line = (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no run yet") + \
                    f"; tasks at 4: {len(done_at)}/{len(task_ids)}"
                state = (sorted((run.run_id, run.status.value) for run in runs), len(done_at))
                if state != seen:
                    seen, last_change = state, now
                active = any(run.status in ACTIVE_RUN_STATUSES for run in runs)
                finished = len(done_at) == len(task_ids) and not active and \
                    not partitions_with_active_runs(instance, SYNC_JOB_NAME)
                stalled = not finished and not active and now - last_change >= stall_s
                if line != shown and (now - last_print >= 5.0 or finished or stalled):
                    print(f"  {now - daemon.started_at:7.1f} s  runs: {line}", flush=True)
                    shown, last_print = line, now
                if finished:
                    return done_at, None
                if stalled:
                    return done_at, _stalled(instance, task_ids, done_at, now - last_change)
                if now - daemon.started_at > timeout_s:
                    raise TimeoutError(f"after {timeout_s:.0f} s: runs {line}\n{daemon.log_tail()}")
            time.sleep(0.25)
    finally:
        engine.dispose()


def _stalled(instance, task_ids: list[int], done_at: dict[int, float], quiet_s: float) -> str:
    import dagster as dg

    from call_pipeline.run_status import SYNC_JOB_NAME

    left = []
    for task_id in task_ids:
        if task_id in done_at:
            continue
        runs = instance.get_runs(
            filters=dg.RunsFilter(job_name=SYNC_JOB_NAME, tags={"dagster/partition": str(task_id)}), limit=1)
        last = (f"last run {runs[0].run_id[:8]} {runs[0].status.value}"
                + (", dagster/will_retry=" + runs[0].tags["dagster/will_retry"]
                   if "dagster/will_retry" in runs[0].tags else "")) if runs else "no run"
        left.append(f"task {task_id} ({last})")
    return (f"nothing happened for {quiet_s:.0f} s and no run is queued or running; not at 4: "
            + ("; ".join(left) if left else "none (a failed run still waits for a retry)"))


def daemon_run_figures(instance, t0: float) -> list[RunFigures]:
    """Every run of sync_call_task in the instance, oldest first: when it was queued (the sensor's
    request), launched (the run queue handed it to the launcher) and ended, and its steps."""
    import dagster as dg
    from dagster._core.events import DagsterEventType

    from call_pipeline.run_status import SYNC_JOB_NAME

    figures = []
    for record in reversed(instance.get_run_records(filters=dg.RunsFilter(job_name=SYNC_JOB_NAME))):
        run = record.dagster_run
        entries = instance.all_logs(run.run_id)
        queued = launched = None
        for entry in entries:
            kind = entry.dagster_event.event_type_value if entry.dagster_event else None
            if kind == DagsterEventType.RUN_ENQUEUED.value and queued is None:
                queued = entry.timestamp
            elif kind == DagsterEventType.RUN_STARTING.value and launched is None:
                launched = entry.timestamp
        launched = launched or record.start_time or record.create_timestamp.timestamp()
        ended = record.end_time or time.time()
        run_figures = RunFigures(run.run_id, run.status == dg.DagsterRunStatus.SUCCESS, ended - launched,
                                 task_id=int(run.tags.get("dagster/partition", 0)), status=run.status.value,
                                 queued_at=None if queued is None else queued - t0, launched_at=launched - t0,
                                 ended_at=ended - t0, parent_run_id=run.parent_run_id)
        figures.append(_step_figures(run_figures, entries, launched))
    return figures


@dataclass
class ManyFigures:
    """--tasks > 1: the whole benchmark's timing (seconds from the daemon's start) and memory."""

    tasks: int
    runs: list[RunFigures]
    done_at: dict[int, float]  # task -> first seen at 4
    first_queued: float
    first_launched: float
    all_done: float
    last_run_ended: float
    wall: float  # from the first run's launch until every task was at 4
    peak_rss: int
    peak_pss: int
    peak_processes: int
    left_behind: list[str]
    stalled: str | None = None  # what stalled: some task never reached 4 (the figures are partial)


def run_many(args, task_ids: list[int], crm_url: str, workdir: str, home: str, executor: str) -> ManyFigures:
    """The tasks, launched by a real dagster-daemon: call_task_sensor adds a partition and requests
    a run per task, the run queue launches them (the QueuedRunCoordinator, every run at once),
    and the sensor relaunches a task whose run left work (or whose group progressed)."""
    import dagster as dg

    daemon = Daemon(workdir)
    memory = None
    try:
        with dg.DagsterInstance.get() as instance, \
                celery_workers(args.workers if executor == "celery" else 0, args.worker_concurrency,
                               home) as workers:
            try:  # the daemon (and whatever runs it launched) stops before the workers and the instance
                daemon.start()
                memory = ProcessTreeMemory([daemon.process.pid, *workers], every_s=0.5, adaptive=True)
                with memory:
                    done_at, stalled = wait_for_tasks(instance, crm_url, task_ids, daemon, args.timeout,
                                                      args.stall_seconds)
                errors = [line for line in daemon.log_tail(200_000).splitlines()
                          if "ERROR" in line or "Error:" in line]
                if stalled and errors:
                    stalled += f"; the daemon's last error: {errors[-1].strip()[-300:]}"
                t0 = daemon.started_at
                runs = daemon_run_figures(instance, t0)
            finally:
                daemon.stop()
    finally:
        left = kill_leftovers(memory.seen) if memory is not None else []
    first_queued = min((r.queued_at for r in runs if r.queued_at is not None), default=0.0)
    first_launched = min((r.launched_at for r in runs if r.launched_at is not None), default=0.0)
    all_done = max(done_at.values(), default=t0) - t0
    return ManyFigures(
        tasks=len(task_ids), runs=runs, done_at={k: v - t0 for k, v in done_at.items()},
        first_queued=first_queued, first_launched=first_launched, all_done=all_done,
        last_run_ended=max(((r.ended_at or 0.0) for r in runs), default=0.0), wall=all_done - first_launched,
        peak_rss=memory.peak_rss, peak_pss=memory.peak_pss, peak_processes=memory.peak_processes,
        left_behind=left, stalled=stalled)


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
    })
    if not args.lasting_fault:
        # nothing should fail; if something does, the benchmark should say so, not back off for minutes
        os.environ.setdefault("CALL_PIPELINE_OP_RETRY_DELAY_SECONDS", "1")
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
    from call_pipeline.domain.followups import PLAN_LLM, plan_follow_up

    engine = create_crm_engine(url)
    llm = recordings = 0
    with engine.connect() as conn:
        for status, conversation, call_task_id in conn.execute(
                sa.select(L.c.call_status, L.c.call_conversation, L.c.call_task_id).where(L.c.task_id == task_id)):
            llm += plan_follow_up(status, conversation) == PLAN_LLM
            recordings += status == "Succeeded" and bool(call_task_id)
    engine.dispose()
    return {"llm": llm, "recordings": recordings}


def bound_seconds(stats: dict, qps_cap: int, llm_latency_s: float, llm_concurrency: int) -> tuple[float, float]:
    """(OutboundBot calls / cap, LLM calls x latency / concurrency), from the simulator's counts."""
    return stats["outboundbot_requests"] / qps_cap, stats["dashscope_requests"] * llm_latency_s / llm_concurrency


def main(argv: list[str] | None = None) -> int:
    if argv and "--live" in argv:
        from call_pipeline.bench_live import main as live

        return live(argv)
    if argv and "--sensor-hour" in argv:
        from call_pipeline.bench_sensor import main as sensor_hour

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
            task_id = task_ids[0]
            simulator = SimulatorProcess(crm_url, task_ids, shares, args.seed, args.outboundbot_latency_ms,
                                         args.llm_latency_ms, qps_cap)
            _environment(crm_url, simulator, args, workdir, UNLIMITED_QPS if qps_cap is None else qps_cap)
            home = _dagster_home(workdir)
            os.environ["DAGSTER_HOME"] = home
            if many:
                daemon_setup = _daemon_environment(args, home, stack)
                figures.update(daemon_setup)

            import dagster as dg

            from call_pipeline.settings import settings

            executor = settings().executor
            figures["executor"] = executor
            if executor == "multiprocess":
                figures.update(max_concurrent=settings().max_concurrent_steps,
                               per_queue=settings().max_concurrent_steps_per_queue)
            print(f"simulator: OutboundBot {args.outboundbot_latency_ms:g} ms/call, cap "
                  f"{qps_cap or 'none'} req/s; LLM {args.llm_latency_ms:g} ms/call; pipeline "
                  f"OUTBOUNDBOT_MAX_QPS={os.environ['OUTBOUNDBOT_MAX_QPS']}, "
                  f"DASHSCOPE_MAX_CONCURRENCY={args.llm_concurrency}; executor {executor}"
                  + (f" (max_concurrent {settings().max_concurrent_steps}, per queue "
                     f"{settings().max_concurrent_steps_per_queue})" if executor == "multiprocess" else "")
                  + f"; set-up {time.perf_counter() - setup_started:.1f} s", flush=True)
            if many:
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
            run_config: dict = {}
            paging = {k: v for k, v in (("page_size", args.page_size), ("pages_per_batch", args.pages_per_batch)) if v}
            if paging:
                run_config["ops"] = {"list_job_pages": {"config": paging}}
            statements_before = mariadb_statement_counts(crm_url) if args.db == "mariadb" else None
            runs: list[RunFigures] = []
            many_figures: ManyFigures | None = None
            if many:
                many_figures = run_many(args, task_ids, crm_url, workdir, home, executor)
                runs = many_figures.runs
            else:
                if args.lasting_fault:
                    simulator.inject_fault({"action": args.lasting_fault, "status": 503,
                                            "code": "ServiceUnavailable", "times": None})
                    args.max_runs = 1
                    print(f"lasting fault: {args.lasting_fault} answers 503 for good; op retries "
                          f"{settings().op_max_retries}, first delay {settings().op_retry_delay_seconds} s", flush=True)
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
            if many:
                outcomes = {tid: task_outcome(crm_url, tid) for tid in task_ids}
                needed = Counter()
                for tid in task_ids:
                    needed.update(needed_calls(crm_url, tid))
                outcome = _total_outcome(outcomes)
                report(args, figures, runs, outcome, stats, dict(needed), statements, qps_cap, many=many_figures)
            else:
                report(args, figures, runs, outcome, stats, needed_calls(crm_url, task_id), statements, qps_cap)
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
    if many:
        ok = all(o["task_type"] == 4 and o["with_follow_up"] == o["matched"] == args.leads for o in outcomes.values())
    else:
        ok = outcome["task_type"] == 4 and outcome["with_follow_up"] == outcome["matched"] == args.leads
    return 0 if ok else 1


def _terminate(signum, frame) -> None:
    print(f"call_pipeline bench: signal {signum}, stopping what the benchmark started", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def _daemon_environment(args: argparse.Namespace, home: str, stack: contextlib.ExitStack) -> dict:
    """--tasks > 1: the instance (its storage, a run queue with room for every task), the sensors'
    tick, the paging settings (sensor runs take no run config) and a RabbitMQ vhost of the
    benchmark's own for Celery. The clean-ups go on `stack`."""
    instance_kind = args.instance or ("mysql" if args.db == "mariadb" else "sqlite")
    if instance_kind == "mysql":
        os.environ.update(stack.enter_context(mysql_instance_env()))
    config = configure_run_queue(home, args.tasks, mysql=instance_kind == "mysql",
                                 dequeue_threads=args.dequeue_threads)
    os.environ["CALL_PIPELINE_SENSOR_TICK_SECONDS"] = str(args.sensor_tick)
    # a task whose run left work is relaunched at the next tick, not in 5 minutes
    os.environ.setdefault("CALL_PIPELINE_SENSOR_INTERVAL_SECONDS", str(max(10, 5 * args.sensor_tick)))
    for name, value in (("CALL_PIPELINE_PAGE_SIZE", args.page_size),
                        ("CALL_PIPELINE_PAGES_PER_BATCH", args.pages_per_batch)):
        if value:
            os.environ[name] = str(value)
    setup = {"instance": instance_kind, "max_concurrent_runs": config["concurrency"]["runs"]["max_concurrent_runs"],
             "sensor_tick_s": args.sensor_tick, "dequeue_threads": args.dequeue_threads, "celery_vhost": None}
    if (os.environ.get("CALL_PIPELINE_EXECUTOR") or "multiprocess") == "celery" and \
            not os.environ.get("CALL_PIPELINE_CELERY_BROKER"):
        vhost = private_vhost()
        if vhost is not None:
            stack.callback(delete_vhost, vhost[0])
            os.environ["CALL_PIPELINE_CELERY_BROKER"] = vhost[1]
            setup["celery_vhost"] = vhost[0]
    return setup


def _total_outcome(outcomes: dict[int, dict]) -> dict:
    total = {key: sum(o[key] for o in outcomes.values()) for key in ("matched", "with_follow_up", "recordings")}
    total["follow_up_rows"] = max(o["follow_up_rows"] for o in outcomes.values())  # the whole table's
    total["tasks_at_4"] = sum(o["task_type"] == 4 for o in outcomes.values())
    total["task_type"] = min(o["task_type"] for o in outcomes.values())
    return total


def report(args, figures: dict, runs: list[RunFigures], outcome: dict, stats: dict, needed: dict,
           statements: Counter | None, qps_cap: int | None, many: ManyFigures | None = None) -> None:
    wall = many.wall if many is not None else sum(run.wall for run in runs)
    if wall <= 0:  # a benchmark that stalled before any task reached 4
        wall = float("nan")
    leads = args.leads * (many.tasks if many is not None else 1)
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
        "process_exit_s": round(runs[-1].process_exit_s, 2) if runs and runs[-1].process_exit_s else None,
        "simulator_peak_rss_mib": round(stats["peak_rss_mib"], 1),
    })
    if many is None:
        figures.update({
            "peak_pss_mib": round(max(r.peak_pss for r in runs) / mib, 1),
            "peak_rss_sum_mib": round(max(r.peak_rss for r in runs) / mib, 1),
            "peak_processes": max(r.peak_processes for r in runs),
            "cpu_s": round(sum(r.cpu_s or 0.0 for r in runs), 1),
        })
    else:
        figures.update({
            "peak_pss_mib": round(many.peak_pss / mib, 1), "peak_rss_sum_mib": round(many.peak_rss / mib, 1),
            "peak_processes": many.peak_processes, "wall_from_daemon_start_s": round(many.all_done, 2),
            "first_run_queued_s": round(many.first_queued, 2), "first_run_launched_s": round(many.first_launched, 2),
            "last_run_ended_s": round(many.last_run_ended, 2), "left_behind": many.left_behind,
            "run_table": [{"task": r.task_id, "run_id": r.run_id, "status": r.status, "retry_of": r.parent_run_id,
                           "queued_s": None if r.queued_at is None else round(r.queued_at, 2),
                           "launched_s": round(r.launched_at or 0.0, 2), "ended_s": round(r.ended_at or 0.0, 2),
                           "wall_s": round(r.wall, 2), "first_step_s": round(r.first_step_s, 2), "steps": r.steps,
                           "task_at_4_s": round(many.done_at[r.task_id], 2) if r.task_id in many.done_at else None}
                          for r in runs],
        })
    print()
    if many is None:
        print(f"leads: {args.leads:,}; runs: {len(runs)}; task_type {outcome['task_type']}; "
              f"matched {outcome['matched']:,}; follow-ups {outcome['with_follow_up']:,}; "
              f"recordings {outcome['recordings']:,}")
        exited = runs[-1].process_exit_s if runs else None
        print(f"wall time: {wall:.1f} s, from the launch to the run's end (first step at {figures['first_step_s']} s"
              + (f"; the run's process exited at {exited:.1f} s)" if exited is not None else ")"))
    else:
        _print_run_table(many)
        relaunched = len(runs) - len({r.task_id for r in runs})
        print(f"tasks: {many.tasks} x {args.leads:,} leads = {leads:,}; runs: {len(runs)} ({relaunched} more than "
              f"one per task); tasks at 4: {outcome['tasks_at_4']}/{many.tasks}; matched {outcome['matched']:,}; "
              f"follow-ups {outcome['with_follow_up']:,}; recordings {outcome['recordings']:,}")
        print(f"timing (s from the daemon's start): first run queued {many.first_queued:.1f}, first launched "
              f"{many.first_launched:.1f}, last launched {max((r.launched_at or 0.0 for r in runs), default=0.0):.1f}; "
              f"every task "
              f"at 4 at {many.all_done:.1f}; last run ended {many.last_run_ended:.1f}")
        if many.stalled:
            figures["stalled"] = many.stalled
            print(f"STALLED: {many.stalled}. The figures below count what was done until then; the wall "
                  "time runs until the last task that reached 4.")
        print(f"wall time: {wall:.1f} s, from the first run's launch until every task was at 4 "
              f"({many.all_done:.1f} s from the daemon's start)")
    if qps_cap is not None:
        ob_bound, llm_bound = bound_seconds(stats, qps_cap, args.llm_latency_ms / 1000, args.llm_concurrency)
        bound = max(ob_bound, llm_bound)
        figures.update({"bound_s": round(bound, 2), "ratio": round(wall / bound, 3) if bound else None})
        if many is not None and bound:
            figures["ratio_from_daemon_start"] = round(many.all_done / bound, 3)
        print(("bound T (all tasks together: the account's limits are shared) = " if many is not None else
               "bound T = ")
              + f"max({stats['outboundbot_requests']:,} OutboundBot calls / {qps_cap} per s = "
              f"{ob_bound:.1f} s, {stats['dashscope_requests']:,} LLM calls x {args.llm_latency_ms / 1000:g} s / "
              f"{args.llm_concurrency} = {llm_bound:.1f} s) = {bound:.1f} s")
        if many is None:
            print(f"wall / T = {wall / bound:.3f}" if bound else "wall / T: no calls")
        else:
            print(f"wall / T = {wall / bound:.3f} (from the daemon's start: {many.all_done / bound:.3f})"
                  if bound else "wall / T: no calls")
    else:
        figures["leads_per_s"] = round(leads / wall, 1)
        print(f"throughput: {leads / wall:,.0f} leads/s")
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
        print("database statements (MariaDB server counters"
              + ("; the Dagster instance's included" if figures.get("instance") == "mysql" else "") + "): "
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
    if many is None:
        print(f"peak memory of the run's processes ({figures['peak_processes']} at most): "
              f"{figures['peak_pss_mib']:.0f} MiB (PSS, shared pages once), {figures['peak_rss_sum_mib']:.0f} MiB "
              f"(RSS summed); simulator process {stats['peak_rss_mib']:.0f} MiB")
        if figures.get("executor") == "celery":
            print(f"CPU of the run's own process (user + system; the Celery workers' is not counted): "
                  f"{figures['cpu_s']:.1f} s")
        else:
            print(f"CPU of the run's processes (user + system, every step process included): {figures['cpu_s']:.1f} s"
                  + (f", {figures['cpu_s'] * 1000 / leads:.2f} ms a lead" if leads else ""))
    else:
        workers = ", the Celery workers" if figures.get("executor") == "celery" else ""
        print(f"peak memory of the whole process tree (the daemon, its code server, the runs and their step "
              f"processes{workers}; {figures['peak_processes']} processes at most): "
              f"{figures['peak_pss_mib']:.0f} MiB (PSS, shared pages once), {figures['peak_rss_sum_mib']:.0f} MiB "
              f"(RSS summed); simulator process {stats['peak_rss_mib']:.0f} MiB")
        print("processes left behind after the daemon and the workers stopped: "
              + ("; ".join(many.left_behind) + " (killed)" if many.left_behind else "none"))


def _print_run_table(many: ManyFigures) -> None:
    print("runs (seconds from the daemon's start; 1st step: from the run's launch; wall: from the launch to "
          "the run's end; at 4: when the bench saw the task at 4):")
    print(f"  {'task':>6}  {'run':<8}  {'queued':>7}  {'launched':>8}  {'1st step':>8}  {'ended':>7}  "
          f"{'wall':>6}  {'steps':>5}  {'at 4':>7}  status")
    for run in many.runs:
        at_4 = many.done_at.get(run.task_id)
        queued = "-" if run.queued_at is None else f"{run.queued_at:.1f}"
        extra = f" (retry of {run.parent_run_id[:8]})" if run.parent_run_id else ""
        extra += f"; failed steps: {', '.join(run.failed_steps[:3])}" if run.failed_steps else ""
        print(f"  {run.task_id:>6}  {run.run_id[:8]:<8}  {queued:>7}  {run.launched_at or 0.0:>8.1f}  "
              f"{run.first_step_s:>8.1f}  {run.ended_at or 0.0:>7.1f}  {run.wall:>6.1f}  {run.steps:>5}  "
              f"{'-' if at_4 is None else f'{at_4:.1f}':>7}  {run.status}{extra}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
