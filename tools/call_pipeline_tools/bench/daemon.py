"""Many tasks at once, through a real dagster-daemon: call_task_sensor requests the runs, the run
queue launches them; the benchmark waits until every task is done and collects each run's figures."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter

import sqlalchemy as sa

from call_pipeline_tools.bench.measuring import ManyFigures, ProcessTreeMemory, RunFigures, step_figures
from call_pipeline_tools.bench.running import celery_workers, kill_group


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
        kill_group(self.process)
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
        figures.append(step_figures(run_figures, entries, launched))
    return figures


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
