"""What the benchmark measures: the memory and CPU of a process tree, MariaDB's statement
counters, a run's steps from its event log, and the bound the cloud's limits allow."""

from __future__ import annotations

import contextlib
import resource
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import sqlalchemy as sa

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


def step_figures(figures: RunFigures, entries, launched_at: float) -> RunFigures:
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


def bound_seconds(stats: dict, qps_cap: int, llm_latency_s: float, llm_concurrency: int) -> tuple[float, float]:
    """(OutboundBot calls / cap, LLM calls x latency / concurrency), from the simulator's counts."""
    return stats["outboundbot_requests"] / qps_cap, stats["dashscope_requests"] * llm_latency_s / llm_concurrency
