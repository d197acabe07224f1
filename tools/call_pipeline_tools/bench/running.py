"""One run of `sync_call_task`, launched as the daemon's run launcher does, and the local Celery
workers the `celery` executor needs."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
import time
import uuid
from collections.abc import Iterator

from call_pipeline_tools.bench.measuring import ProcessTreeMemory, RunFigures, step_figures


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
    figures = step_figures(figures, instance.all_logs(run.run_id), launched_at)
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
            kill_group(process)


def wait_for_workers(count: int, timeout_s: float = 90.0) -> None:
    from call_pipeline.celery_app import app

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=1.0) or []
        if len(replies) >= count:
            return
    raise RuntimeError(f"{count} Celery worker(s) did not answer within {timeout_s:.0f} s")


def kill_group(process) -> None:
    """SIGKILL what is left of the process group that `process` leads (started in a session of its
    own), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        process.wait(timeout=10)
