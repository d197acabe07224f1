"""`call-pipeline bench --live N`: live campaigns as a dealer group runs them (SPEC §11).

N live tasks (`--leads` each, 200 by default) whose calls end one by one over `--spread` seconds
(240), beside `--idle` tasks (10) whose calls have not started, all run by the project's sensors
through `call-pipeline serve --no-ui`, as in production. It prints, from the moment a job turns
terminal in the (simulated) cloud to its lead's `leads_follow_id` in the CRM: p50, p95 and max;
the runs launched; the CPU of everything `serve` started, in all and per run; OutboundBot calls per
result; LLM calls against the leads that need one; and what the cloud throttled.

    call-pipeline bench --live 1                                   # the embedded default
    call-pipeline bench --live 30 --production                     # MariaDB CRM and instance
                                                                   # (deploy/dagster.yaml), Redis limits

The cloud is the simulator in a child process (its CPU is not the pipeline's): each live job
starts `Executing` and turns to its planned final status at its time; the idle tasks' jobs stay
`Scheduling`. The CRM and the Dagster instance are fresh and temporary.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from call_pipeline.run_status import SYNC_JOB_NAME
from call_pipeline_tools.bench.crm import JOB_GROUP_ID, crm_database, needed_calls, seed_task, task_outcome
from call_pipeline_tools.bench.environment import delete_vhost, mysql_instance_env, private_vhost
from call_pipeline_tools.bench.measuring import peak_rss_mib

REDIS_URL = os.environ.get("CALL_PIPELINE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SHARES = {"Succeeded": 0.65, "Failed": 0.30, "Cancelled": 0.05}
PR_SET_CHILD_SUBREAPER = 36


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="call-pipeline bench --live", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--live", type=int, required=True, help="live tasks, whose calls end over --spread seconds")
    p.add_argument("--idle", type=int, default=10, help="tasks whose calls have not started (10)")
    p.add_argument("--leads", type=int, default=200, help="leads (and jobs) per task (200)")
    p.add_argument("--spread", type=float, default=240.0, help="the calls of every live task end over this (240 s)")
    p.add_argument("--production", action="store_true",
                   help="the production shape: CRM and Dagster instance on MariaDB (deploy/dagster.yaml: runs on "
                        "a Celery run worker, in process), limits in Redis, a RabbitMQ vhost of the benchmark's own")
    p.add_argument("--outboundbot-latency-ms", type=float, default=30.0, help="per OutboundBot call (30)")
    p.add_argument("--llm-latency-ms", type=float, default=300.0, help="per LLM call (300)")
    p.add_argument("--qps-cap", type=int, default=50, help="the cloud's OutboundBot cap, and OUTBOUNDBOT_MAX_QPS (50)")
    p.add_argument("--llm-concurrency", type=int, default=16, help="DASHSCOPE_MAX_CONCURRENCY (16)")
    p.add_argument("--settle", type=float, default=600.0,
                   help="after the last call ends, wait at most this long for every live task to reach 4 (600 s)")
    p.add_argument("--idle-window", type=float, default=60.0,
                   help="after the first syncs, before any call ends: seconds in which the machine only watches, "
                        "to tell the CPU of watching (sensors, schedule, daemon) from the runs' (60)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep the benchmark's folder (serve's log, the instance)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    return p


# ---- the cloud: live jobs ------------------------------------------------------------------------


def _serve_live_simulator(pipe, crm_url: str, live: list[int], idle: list[int], seed: int,
                          outboundbot_ms: float, llm_ms: float, qps_cap: int) -> None:
    from call_pipeline_tools.simulator.scenarios import build_job_group_from_crm, executing_task
    from call_pipeline_tools.simulator.server import start_simulator
    from call_pipeline_tools.simulator.state import SimulatorState

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark stops it after what uses it
    state = SimulatorState(seed=seed)
    jobs_by_group: dict[str, list[str]] = {}
    for task_id in [*live, *idle]:
        group = build_job_group_from_crm(crm_url, task_id, status_mix=SHARES, seed=seed)
        for job in group["jobs"]:
            # the call's planned end is what `advance` applies later; until then it is ringing
            outcome = {"Status": job["Status"], "FailureReason": job.get("FailureReason", ""),
                       "Tasks": job.get("Tasks", []), "Summary": job.get("Summary", [])}
            job["_sim"] = {**job.get("_sim", {}), "outcome": outcome}
            if task_id in live:
                in_flight = executing_task(outcome)
                job.update(Status="Executing", FailureReason="", Summary=[], Tasks=[in_flight] if in_flight else [])
            else:
                job.update(Status="Scheduling", FailureReason="", Summary=[], Tasks=[])
        if task_id in live:
            jobs_by_group[group["JobGroupId"]] = [job["JobId"] for job in group["jobs"]]
        state.add_job_group(group)
    state.set_latency(outboundbot_ms, llm_ms)
    state.set_qps_cap(qps_cap)
    handle = start_simulator(state=state)
    pipe.send({"endpoint": handle.endpoint, "dashscope_base_url": handle.dashscope_base_url, "jobs": jobs_by_group})
    usage = resource.getrusage(resource.RUSAGE_SELF)
    try:
        while True:
            message = pipe.recv()
            if message == "stats":
                stats = state.stats()
                stats.pop("per_second", None)
                now = resource.getrusage(resource.RUSAGE_SELF)
                stats["cpu_s"] = now.ru_utime + now.ru_stime - usage.ru_utime - usage.ru_stime
                stats["peak_rss_mib"] = peak_rss_mib()
                pipe.send(stats)
            elif isinstance(message, tuple) and message[0] == "end":
                _, group_id, job_ids = message
                state.advance(group_id, 1, job_ids)
                pipe.send(time.time())
            elif message == "stop":
                break
    finally:
        handle.stop()


class LiveCloud:
    """The simulator in a child process; `end_calls` turns jobs terminal and says when."""

    def __init__(self, crm_url: str, live: list[int], idle: list[int], args: argparse.Namespace) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self._lock = threading.Lock()
        self._process = context.Process(
            target=_serve_live_simulator, name="bench-live-simulator", daemon=True,
            args=(child, crm_url, live, idle, args.seed, args.outboundbot_latency_ms, args.llm_latency_ms,
                  args.qps_cap))
        self._process.start()
        if not self._pipe.poll(600):
            self.stop()
            raise RuntimeError("the simulator did not start")
        info = self._pipe.recv()
        self.endpoint: str = info["endpoint"]
        self.dashscope_base_url: str = info["dashscope_base_url"]
        self.jobs: dict[str, list[str]] = info["jobs"]

    def end_calls(self, group_id: str, job_ids: list[str]) -> float:
        with self._lock:
            self._pipe.send(("end", group_id, job_ids))
            return self._pipe.recv()

    def stats(self) -> dict:
        with self._lock:
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


def call_schedule(jobs: dict[str, list[str]], spread_s: float, seed: int) -> list[tuple[float, str, str]]:
    """(seconds from the start, group, job) for every live job: ends spread evenly at random."""
    rng = random.Random(seed)
    plan = [(rng.uniform(0, spread_s), group, job) for group, ids in jobs.items() for job in ids]
    return sorted(plan)


class CallEnder(threading.Thread):
    """Ends the live calls at their planned times (every 0.5 s, the jobs whose time came, by group),
    and keeps when each turned terminal."""

    def __init__(self, cloud: LiveCloud, plan: list[tuple[float, str, str]]) -> None:
        super().__init__(name="bench-call-ender", daemon=True)
        self.cloud, self.plan = cloud, plan
        self.ended_at: dict[str, float] = {}
        self.started_at = 0.0
        self.stop_event = threading.Event()

    def run(self) -> None:
        self.started_at = time.time()
        index = 0
        while index < len(self.plan) and not self.stop_event.is_set():
            elapsed = time.time() - self.started_at
            due: dict[str, list[str]] = defaultdict(list)
            while index < len(self.plan) and self.plan[index][0] <= elapsed:
                due[self.plan[index][1]].append(self.plan[index][2])
                index += 1
            for group, job_ids in due.items():
                at = self.cloud.end_calls(group, job_ids)
                self.ended_at.update(dict.fromkeys(job_ids, at))
            self.stop_event.wait(0.5)


class FollowUpWatcher(threading.Thread):
    """Reads the CRM every 0.5 s for the live jobs whose lead has its follow-up and keeps when each
    was first seen. Not by follow-up id above the last one read: run workers writing side by side
    commit ids out of order, and an id committed after a higher one was read would never be seen."""

    def __init__(self, crm_url: str, task_ids: list[int]) -> None:
        super().__init__(name="bench-follow-up-watcher", daemon=True)
        self.crm_url, self.task_ids = crm_url, task_ids
        self.seen_at: dict[str, float] = {}
        self.stop_event = threading.Event()

    def run(self) -> None:
        from call_pipeline.crm.database import create_crm_engine
        from call_pipeline.crm.schema import dcc_leads_follow as F
        from call_pipeline.crm.schema import leads_task_list as L

        engine = create_crm_engine(self.crm_url)
        try:
            while not self.stop_event.is_set():
                with engine.connect() as conn:
                    rows = conn.execute(sa.select(L.c.call_job_id).join(F, L.c.leads_follow_id == F.c.id)
                                        .where(L.c.task_id.in_(self.task_ids))).scalars().all()
                now = time.time()
                for job_id in rows:
                    self.seen_at.setdefault(job_id, now)
                self.stop_event.wait(0.5)
        finally:
            engine.dispose()


# ---- the deployment: `call-pipeline serve --no-ui` -----------------------------------------------


# What a process of serve's tree is, by a piece of its command line (the first that matches).
PROCESS_KINDS = (("call_pipeline.daemon", "daemon"), ("code-server start", "code server (reloadable proxy)"),
                 ("api grpc", "code server"), (" serve", "serve"), ("call_pipeline.cli worker", "Celery workers"))


def process_kind(cmdline: str) -> str:
    return next((kind for needle, kind in PROCESS_KINDS if needle in cmdline), "runs and others")


class Serve:
    """`call-pipeline serve --no-ui` in a session of its own. The benchmark is a child subreaper
    (Linux): processes that `serve`'s tree leaves to their grandparent (a run's forkserver, a code
    server) are reparented to it and reaped here, so the CPU of everything serve started is the
    benchmark's RUSAGE_CHILDREN after it stops."""

    def __init__(self, workdir: str) -> None:
        self.log_path = os.path.join(workdir, "serve.log")
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self._reaper_stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self._keep: set[int] = set()

    def start(self, keep_pids: set[int]) -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        binary = os.path.join(os.path.dirname(sys.executable), "call-pipeline")
        command = [binary] if os.path.exists(binary) else [sys.executable, "-m", "call_pipeline.cli"]
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child holds it
        try:
            self.started_at = time.time()
            self.process = subprocess.Popen([*command, "serve", "--no-ui"], stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        finally:
            log.close()
        self._keep = {*keep_pids, self.process.pid}
        self._reaper = threading.Thread(target=self._reap_orphans, name="bench-reaper", daemon=True)
        self._reaper.start()

    def _reap_orphans(self) -> None:
        # Only orphans reparented here: the benchmark's own children (serve, the simulator) are
        # waited for by their owners.
        import psutil

        me = os.getpid()
        while not self._reaper_stop.wait(0.5):
            for child in psutil.Process(me).children():
                if child.pid in self._keep:
                    continue
                with contextlib.suppress(ChildProcessError, OSError, psutil.Error):
                    if child.status() == psutil.STATUS_ZOMBIE:
                        os.waitpid(child.pid, os.WNOHANG)

    def _processes(self) -> Iterator[tuple[Any, Any]]:
        """Each process of serve's tree alive now, with its CPU times so far."""
        import psutil

        if self.process is None:
            return
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.process.pid)
            for process in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    yield process, process.cpu_times()

    def tree_cpu(self) -> float:
        """CPU (user + system) of everything serve started so far: the processes alive now with
        what they reaped, plus what the benchmark reaped (the orphans; serve itself at the end)."""
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        return reaped.ru_utime + reaped.ru_stime + sum(
            t.user + t.system + t.children_user + t.children_system for _, t in self._processes())

    def cpu_by_process(self) -> dict[str, float]:
        """CPU (user + system) so far of each process of serve's tree alive now, summed by what it
        is (PROCESS_KINDS): where watching goes."""
        import psutil

        totals: dict[str, float] = defaultdict(float)
        for process, t in self._processes():
            with contextlib.suppress(psutil.Error):
                totals[process_kind(" ".join(process.cmdline()))] += t.user + t.system
        return totals

    def check(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"call-pipeline serve exited ({self.process.returncode}):\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError), open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()[-chars:]
        return ""

    def stop(self) -> list[str]:
        """SIGTERM, as an operator would; returns the processes left behind (then killed)."""
        import psutil

        if self.process is None:
            return []
        tree = []
        with contextlib.suppress(psutil.Error):
            tree = psutil.Process(self.process.pid).children(recursive=True)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        _, alive = psutil.wait_procs(tree, timeout=10)
        left = []
        for process in alive:
            with contextlib.suppress(psutil.Error):
                left.append(f"{process.pid} {' '.join(process.cmdline())[:100]}")
                process.kill()
        psutil.wait_procs(alive, timeout=5)
        time.sleep(1.0)  # the reaper's last round
        self._reaper_stop.set()
        if self._reaper is not None:
            self._reaper.join()
        return left


# ---- the figures ---------------------------------------------------------------------------------


@dataclass
class LiveFigures:
    live: int
    idle: int
    leads: int
    latencies: list[float] = field(default_factory=list)
    missing: int = 0
    runs: Counter = field(default_factory=Counter)
    runs_launched: int = 0
    cpu_s: float = 0.0
    live_runs: int = 0  # runs started after the first syncs, while the calls ended
    live_cpu_s: float = 0.0  # the CPU of that phase
    live_wall_s: float = 0.0
    idle_wall_s: float = 0.0  # the idle window: no call ends, the sensors only watch
    idle_cpu_s: float = 0.0
    idle_runs: int = 0
    idle_cpu_by_process: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    tasks_at_4: int = 0
    outboundbot_requests: int = 0
    requests: dict = field(default_factory=dict)
    throttled: int = 0
    llm_calls: int = 0
    llm_needed: int = 0
    left_behind: list[str] = field(default_factory=list)
    max_start_delay_s: float = 0.0

    def run_cpu_beyond_watching(self) -> float | None:
        """CPU per run of the live phase beyond what the machine spends watching (the idle window's
        rate over the live phase's wall time): what a run costs, its launch included."""
        if not self.live_runs or not self.idle_wall_s or self.idle_runs:
            return None
        return (self.live_cpu_s - self.idle_cpu_s / self.idle_wall_s * self.live_wall_s) / self.live_runs

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]

    def as_dict(self) -> dict:
        return {"live": self.live, "idle": self.idle, "leads": self.leads,
                "freshness_s": {"p50": self.percentile(0.50), "p95": self.percentile(0.95),
                                "max": max(self.latencies, default=float("nan")), "n": len(self.latencies),
                                "missing": self.missing},
                "runs_launched": self.runs_launched, "runs": dict(self.runs), "cpu_s": self.cpu_s,
                "cpu_per_run_s": self.cpu_s / self.runs_launched if self.runs_launched else None,
                "live_runs": self.live_runs, "live_cpu_s": self.live_cpu_s,
                "live_cpu_per_run_s": self.live_cpu_s / self.live_runs if self.live_runs else None,
                "idle_wall_s": self.idle_wall_s, "idle_cpu_s": self.idle_cpu_s, "idle_runs": self.idle_runs,
                "idle_cpu_by_process_s": self.idle_cpu_by_process,
                "run_cpu_beyond_watching_s": self.run_cpu_beyond_watching(),
                "wall_s": self.wall_s, "tasks_at_4": self.tasks_at_4,
                "outboundbot_requests": self.outboundbot_requests, "requests": self.requests,
                "outboundbot_calls_per_result": self.outboundbot_requests / max(1, self.live * self.leads),
                "throttled": self.throttled, "llm_calls": self.llm_calls, "llm_needed": self.llm_needed,
                "max_start_delay_s": self.max_start_delay_s, "left_behind": self.left_behind}


def print_figures(figures: LiveFigures) -> None:
    d = figures.as_dict()
    f = d["freshness_s"]
    print(f"\nfrom a call's end to its follow-up in the CRM ({f['n']} calls"
          + (f", {f['missing']} without a follow-up" if f["missing"] else "") + "):")
    print(f"  p50 {f['p50']:.1f} s   p95 {f['p95']:.1f} s   max {f['max']:.1f} s")
    print(f"runs launched: {figures.runs_launched} ({', '.join(f'{k} {v}' for k, v in sorted(figures.runs.items()))}); "
          f"longest wait from queued to started {figures.max_start_delay_s:.1f} s")
    per_run, live_per_run = d["cpu_per_run_s"], d["live_cpu_per_run_s"]
    print(f"CPU of everything serve started: {figures.cpu_s:.1f} s in {figures.wall_s:.0f} s"
          + (f", {per_run:.2f} s per run" if per_run is not None else "")
          + f"; while the calls ended: {figures.live_cpu_s:.1f} s for {figures.live_runs} run(s)"
          + (f", {live_per_run:.2f} s per run (the sensors' and the daemon's share included)"
             if live_per_run is not None else ""))
    if figures.idle_wall_s:
        beyond = d["run_cpu_beyond_watching_s"]
        print(f"CPU of watching (the idle window: {figures.idle_wall_s:.0f} s, {figures.idle_runs} run(s)): "
              f"{figures.idle_cpu_s:.1f} s, {60 * figures.idle_cpu_s / figures.idle_wall_s:.1f} s a minute"
              + (f"; a run beyond watching: {beyond:.2f} s" if beyond is not None else ""))
        print("  watching, a minute, by process: " + ", ".join(
            f"{kind} {60 * cpu / figures.idle_wall_s:.2f} s"
            for kind, cpu in sorted(figures.idle_cpu_by_process.items(), key=lambda item: -item[1])))
    print(f"OutboundBot calls: {figures.outboundbot_requests} ({d['outboundbot_calls_per_result']:.2f} per result; "
          + ", ".join(f"{k} {v}" for k, v in sorted(figures.requests.items())) + f"); throttled {figures.throttled}")
    print(f"LLM calls: {figures.llm_calls} for {figures.llm_needed} leads that need one"
          + (" (none twice)" if figures.llm_calls == figures.llm_needed else ""))
    print(f"live tasks at 4: {figures.tasks_at_4}/{figures.live}")
    if figures.left_behind:
        print(f"LEFT BEHIND after serve stopped (killed): {figures.left_behind}")


def run_figures(instance, since: float) -> tuple[Counter, int, int, float]:
    """Runs by status, how many started (in all, and from `since` on), and the longest wait from
    queued to started."""
    import dagster as dg
    from dagster._core.events import DagsterEventType

    statuses: Counter = Counter()
    launched = launched_since = 0
    longest = 0.0
    for record in instance.get_run_records(filters=dg.RunsFilter(job_name=SYNC_JOB_NAME)):
        statuses[record.dagster_run.status.value.lower()] += 1
        queued = started = None
        for entry in instance.all_logs(record.dagster_run.run_id, of_type={
                DagsterEventType.RUN_ENQUEUED, DagsterEventType.RUN_START}):
            kind = entry.dagster_event.event_type_value
            if kind == DagsterEventType.RUN_ENQUEUED.value and queued is None:
                queued = entry.timestamp
            elif kind == DagsterEventType.RUN_START.value and started is None:
                started = entry.timestamp
        if started is not None:
            launched += 1
            launched_since += started >= since
            if queued is not None:
                longest = max(longest, started - queued)
    return statuses, launched, launched_since, longest


def tasks_at_4(crm_url: str, task_ids: list[int]) -> int:
    return sum(task_outcome(crm_url, task_id)["task_type"] == 4 for task_id in task_ids)


# ---- the benchmark -------------------------------------------------------------------------------


def _environment(args: argparse.Namespace, crm_url: str, cloud: LiveCloud, workdir: str) -> None:
    from call_pipeline.clients.proxies import drop_proxy_variables

    drop_proxy_variables()
    os.environ.update({
        "CALL_PIPELINE_CRM_URL": crm_url,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "bench-access-key",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "bench-access-secret",
        "OUTBOUNDBOT_INSTANCE_ID": "bench-instance",
        "OUTBOUNDBOT_ENDPOINT": cloud.endpoint,
        "OUTBOUNDBOT_PROTOCOL": "http",
        "DASHSCOPE_API_KEY": "sk-bench",
        "DASHSCOPE_HTTP_BASE_URL": cloud.dashscope_base_url,
        "OUTBOUNDBOT_MAX_QPS": str(args.qps_cap),
        "DASHSCOPE_MAX_CONCURRENCY": str(args.llm_concurrency),
        "CALL_PIPELINE_STATE_DIR": os.path.join(workdir, "limits"),
        "CALL_PIPELINE_OP_RETRY_DELAY_SECONDS": os.environ.get("CALL_PIPELINE_OP_RETRY_DELAY_SECONDS", "1"),
    })


@contextlib.contextmanager
def dagster_home(args: argparse.Namespace, workdir: str) -> Iterator[str]:
    """The project's dagster.yaml (the embedded default), or with --production deploy/dagster.yaml on
    a MariaDB database of its own, limits in Redis under a prefix of the benchmark's own and a
    RabbitMQ vhost of its own."""
    from call_pipeline.crm.database import PROJECT_ROOT

    home = os.path.join(workdir, "dagster_home")
    os.makedirs(home)
    source = PROJECT_ROOT / ("deploy/dagster.yaml" if args.production else "dagster.yaml")
    shutil.copy(source, os.path.join(home, "dagster.yaml"))
    os.environ["DAGSTER_HOME"] = home
    with contextlib.ExitStack() as stack:
        if args.production:
            os.environ.update(stack.enter_context(mysql_instance_env()))
            prefix = f"call_pipeline_bench_{uuid.uuid4().hex[:8]}"
            # the executor inside a run worker of deploy/dagster.yaml's CeleryRunLauncher (README, Executors)
            os.environ.update({"CALL_PIPELINE_REDIS_URL": REDIS_URL, "CALL_PIPELINE_REDIS_KEY_PREFIX": prefix,
                               "CALL_PIPELINE_EXECUTOR": "in_process"})
            stack.callback(_drop_redis_keys, prefix)
            # deploy/dagster.yaml's launcher reads the broker and the results' backend from the
            # environment, as every process of the deployment gets them
            os.environ.setdefault("CALL_PIPELINE_CELERY_BACKEND", REDIS_URL)
            vhost = private_vhost()
            if vhost is None:
                raise SystemExit("--production needs rabbitmqctl for a RabbitMQ vhost of the benchmark's own")
            stack.callback(delete_vhost, vhost[0])
            os.environ["CALL_PIPELINE_CELERY_BROKER"] = vhost[1]
        yield home


def _drop_redis_keys(prefix: str) -> None:
    import redis

    with contextlib.suppress(Exception):
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"*{prefix}*"):
            client.delete(key)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.live < 1 or args.idle < 0 or args.leads < 1:
        raise SystemExit("--live must be at least 1, --idle at least 0 and --leads at least 1")
    workdir = tempfile.mkdtemp(prefix="call_pipeline_bench_live_")
    cloud: LiveCloud | None = None
    figures = LiveFigures(args.live, args.idle, args.leads)
    previous_sigterm = signal.signal(signal.SIGTERM, _terminate)
    try:
        with crm_database("mariadb" if args.production else "sqlite", workdir) as crm_url, \
                dagster_home(args, workdir):
            tasks = [seed_task(crm_url, args.leads, f"{JOB_GROUP_ID}-{n + 1}", n * args.leads, f" #{n + 1}")
                     for n in range(args.live + args.idle)]
            live, idle = tasks[:args.live], tasks[args.live:]
            cloud = LiveCloud(crm_url, live, idle, args)
            _environment(args, crm_url, cloud, workdir)
            shape = ("production: CRM and instance on MariaDB (deploy/dagster.yaml), limits in Redis"
                     if args.production else "embedded default: SQLite CRM, the project's dagster.yaml")
            print(f"call_pipeline bench --live: {args.live} live task(s) x {args.leads} leads, calls ending "
                  f"over {args.spread:g} s, beside {args.idle} idle task(s); {shape}; cloud "
                  f"{args.outboundbot_latency_ms:g} ms per OutboundBot call (cap {args.qps_cap}/s), "
                  f"{args.llm_latency_ms:g} ms per LLM call ({args.llm_concurrency} at once)", flush=True)
            figures = _run(args, crm_url, cloud, tasks, live, workdir, figures)
            stats = cloud.stats()
            figures.outboundbot_requests = stats["outboundbot_requests"]
            figures.requests = stats["requests"]
            figures.throttled = stats["throttled"]
            figures.llm_calls = stats["dashscope_requests"]
            figures.llm_needed = sum(needed_calls(crm_url, task_id)["llm"] for task_id in live)
            figures.tasks_at_4 = tasks_at_4(crm_url, live)
            print_figures(figures)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        if cloud is not None:
            cloud.stop()
        if args.keep:
            print(f"the benchmark's folder is kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(figures.as_dict(), handle, indent=1, default=str)
    ok = (figures.tasks_at_4 == args.live and not figures.missing and figures.llm_calls == figures.llm_needed
          and not figures.left_behind)
    return 0 if ok else 1


def wait_for_first_syncs(instance, serve: Serve, tasks: int, timeout_s: float) -> int:
    """Until every task had a successful run: its jobs are matched while its calls are ringing, as
    when a campaign has started. Freshness is measured from then on. Returns the runs so far."""
    import dagster as dg

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        serve.check()
        runs = instance.get_runs(filters=dg.RunsFilter(job_name=SYNC_JOB_NAME))
        done = {run.tags.get("dagster/partition") for run in runs if run.status == dg.DagsterRunStatus.SUCCESS}
        if len(done) >= tasks:
            return len(runs)
        time.sleep(1.0)
    raise TimeoutError(f"not every task had a successful run within {timeout_s:.0f} s:\n{serve.log_tail()}")


def _run(args: argparse.Namespace, crm_url: str, cloud: LiveCloud, tasks: list[int], live: list[int],
         workdir: str, figures: LiveFigures) -> LiveFigures:
    import dagster as dg

    serve = Serve(workdir)
    ender = CallEnder(cloud, call_schedule(cloud.jobs, args.spread, args.seed))
    watcher = FollowUpWatcher(crm_url, live)
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # The fresh home's storage is created here, before serve's processes open it: two processes
    # creating one SQLite storage at once can both stamp its schema version (alembic: "more than
    # one head"), and the daemon then fails to start.
    dg.DagsterInstance.get().dispose()
    serve.start(keep_pids={cloud._process.pid})
    try:
        with dg.DagsterInstance.get() as instance:
            first_syncs = wait_for_first_syncs(instance, serve, len(tasks), args.settle)
        print(f"  {time.time() - serve.started_at:6.1f} s  every task's first sync is done ({first_syncs} run(s)); "
              "the calls start ending", flush=True)
        if args.idle_window > 0:
            idle_from, idle_cpu_from, by_process_from = time.time(), serve.tree_cpu(), serve.cpu_by_process()
            time.sleep(args.idle_window)
            figures.idle_wall_s, figures.idle_cpu_s = time.time() - idle_from, serve.tree_cpu() - idle_cpu_from
            figures.idle_cpu_by_process = {kind: round(cpu - by_process_from.get(kind, 0.0), 3)
                                           for kind, cpu in serve.cpu_by_process().items()}
            with dg.DagsterInstance.get() as instance:
                figures.idle_runs = run_figures(instance, idle_from)[2]
            print(f"  {time.time() - serve.started_at:6.1f} s  the idle window has passed", flush=True)
        live_from, cpu_from = time.time(), serve.tree_cpu()
        ender.start()
        watcher.start()
        while ender.is_alive():
            serve.check()
            time.sleep(1.0)
        print(f"  {time.time() - serve.started_at:6.1f} s  every live call has ended", flush=True)
        deadline = time.time() + args.settle
        with dg.DagsterInstance.get() as instance:
            while time.time() < deadline:
                serve.check()
                done = len(watcher.seen_at) >= len(ender.ended_at) and tasks_at_4(crm_url, live) == len(live)
                if done:
                    break
                time.sleep(2.0)
            print(f"  {time.time() - serve.started_at:6.1f} s  follow-ups seen: {len(watcher.seen_at)}/"
                  f"{len(ender.ended_at)}; stopping serve", flush=True)
            figures.wall_s = time.time() - serve.started_at
            figures.live_cpu_s = serve.tree_cpu() - cpu_from
            figures.live_wall_s = time.time() - live_from
            figures.runs, figures.runs_launched, figures.live_runs, figures.max_start_delay_s = \
                run_figures(instance, live_from)
    finally:
        ender.stop_event.set()
        watcher.stop_event.set()
        figures.left_behind = serve.stop()
        if watcher.ident is not None:
            watcher.join(timeout=10)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    figures.cpu_s = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
    figures.latencies = [watcher.seen_at[job] - at for job, at in ender.ended_at.items() if job in watcher.seen_at]
    figures.missing = sum(job not in watcher.seen_at for job in ender.ended_at)
    return figures


def _terminate(signum, frame) -> None:
    print(f"call_pipeline bench --live: signal {signum}, stopping what the benchmark started", file=sys.stderr,
          flush=True)
    raise SystemExit(128 + signum)
