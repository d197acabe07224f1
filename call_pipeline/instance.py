"""The project's instance class (`instance_class` in both dagster.yaml files), its run launchers (the
production shape's Celery one, the embedded default's preloaded one), and the pools every
instance holds before its first run.

The instance class differs from Dagster's own in three things. Its default storage keeps one
pooled database engine per file and process (call_pipeline/storage.py). In a process that asked
for it (`keep_connections_in_this_process`: the daemon, every process that loads the definitions)
its MySQL storages keep their connections (`keep_connections`). Starting a run does not reconfigure the process's
logging when the instance defines no logging handlers (`python_logs.dagster_handler_config`).
Dagster 1.13 calls `logging.config.dictConfig` for every run it starts, handlers or not; dictConfig
holds logging's module lock while it flushes and closes every handler of the process, each under
its own lock. In a run worker with a threads pool (many runs in one process, see README "Runs on
Celery workers") another run's thread that is inside a handler (the event log's, writing to the
database) and asks for the module lock then deadlocks with it: measured, 100 runs at once on a
threads pool stopped within a second, every thread waiting on a logging lock. Without configured
handlers the call only returns an empty list, so it is skipped; with them, one run at a time
configures them.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import multiprocessing.forkserver
import socket
import threading
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import psutil
from dagster._core.instance import DagsterInstance
from dagster._core.instance.ref import InstanceRef
from dagster._core.launcher import CheckRunHealthResult, LaunchRunContext, RunLauncher, WorkerStatus
from dagster._core.storage.dagster_run import DagsterRun
from dagster._serdes import ConfigurableClass, ConfigurableClassData
from dagster_celery.launcher import CeleryRunLauncher
from dagster_celery.tags import DAGSTER_CELERY_TASK_ID_TAG

from call_pipeline.executors import FORKSERVER_PRELOAD, start_step_forkserver
from call_pipeline.queues import STEP_QUEUES
from call_pipeline.run_worker import execute_run

_CONFIGURING = threading.Lock()

# Kept MySQL connections are recycled after an hour, the webserver's default.
POOL_RECYCLE_S = 3600
# MySQL connections the daemon keeps per storage; beyond them, when more of its threads query at
# once (its run queue launches on 8 and its sensors submit on 8), one is opened and closed, as
# Dagster's are. Four, not eight: a burst of 100 runs peaked at 152 of MariaDB's 151 connections
# with 8 and at 147 with 4 (the run workers' are most of them; README "Runs on Celery workers").
KEPT_CONNECTIONS = 4

# The engines a process keeps: one per storage of the instance it uses (three); a process that
# opens instances of other databases (the tests) closes the least recently used.
KEPT_ENGINES = 6


@functools.cache
def _kept_engines() -> Any:
    """The MySQL engines this process keeps (`storage.Engines`, made at first use: an instance of
    another kind imports nothing for it)."""
    from call_pipeline.storage import Engines

    return Engines(KEPT_ENGINES)


def keep_connections(instance: DagsterInstance, size: int) -> None:
    """Makes each of the instance's MySQL storages keep `size` connections (beyond them, as many
    as asked for at once, each closed when given back): the same engine as dagster-mysql's own,
    which opens a connection for every query (or, after Dagster's `optimize_for_webserver`, keeps
    one), but for that size. The engine is the process's, for every instance it opens of that
    database (Dagster's code server opens one for every sensor tick). A storage of another kind is
    left as it is."""
    for storage in (instance.run_storage, instance.event_log_storage, instance.schedule_storage):
        url = getattr(storage, "mysql_url", None)
        if url is None:
            continue
        # Imported here: an instance of another kind (SQLite) imports no MySQL driver for this.
        import sqlalchemy as sa
        from dagster_mysql.utils import mysql_isolation_level

        from call_pipeline.storage import dropped_in_forked_children

        def make(url: str = url) -> Any:
            return dropped_in_forked_children(sa.create_engine(
                url, isolation_level=mysql_isolation_level(), pool_size=size, pool_recycle=POOL_RECYCLE_S,
                max_overflow=-1))

        engine = _kept_engines().get((type(storage).__name__, url, size), make)
        if storage._engine is not engine and not _kept_engines().holds(storage._engine):  # noqa: SLF001
            storage._engine.dispose()  # noqa: SLF001 - dagster-mysql's storages keep their engine there
        storage._engine = engine  # noqa: SLF001


def keep_connections_in_this_process(size: int = KEPT_CONNECTIONS) -> None:
    """For the rest of this process, an instance of the project's class keeps `size` connections
    to each of its MySQL storages (`keep_connections`)."""
    PipelineInstance.kept_connections = size


class PipelineInstance(DagsterInstance):
    """Dagster's instance; runs started side by side in one process do not reconfigure logging;
    without a storage setting, its SQLite storage is the project's (`storage.SqliteStorage`)."""

    # MySQL connections each storage keeps in a process that asked for it before opening its
    # instance (`keep_connections_in_this_process`); 0, Dagster's: a new connection for every query.
    kept_connections: ClassVar[int] = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if PipelineInstance.kept_connections:
            keep_connections(self, PipelineInstance.kept_connections)

    # What Dagster asks of an `instance_class`: no settings of its own, Dagster's defaults.
    @classmethod
    def config_schema(cls) -> Mapping[str, Any]:
        return {}

    @staticmethod
    def config_defaults(base_dir: str) -> Mapping[str, Any]:
        # Without a `storage` setting (the embedded default), Dagster's SQLite storage in its own
        # files under the home, with one engine per database file (call_pipeline/storage.py).
        from call_pipeline.storage import sqlite_storage_defaults

        return {**InstanceRef.config_defaults(base_dir), **sqlite_storage_defaults(base_dir)}

    def get_yaml_python_handlers(self) -> Sequence[logging.Handler]:
        if not self.get_python_log_dagster_handler_config():
            return []
        with _CONFIGURING:
            return super().get_yaml_python_handlers()


def mark_canceling(instance: DagsterInstance, run_id: str) -> DagsterRun | None:
    """Terminate, as the project's launchers do it: the run, unless unknown or finished, is marked
    CANCELING, and its run worker interrupts it (`run_worker.interrupted_while_canceling`). The
    run marked; None when there is nothing to terminate."""
    run = instance.get_run_by_id(run_id)
    if run is None or run.is_finished:
        return None
    instance.report_run_canceling(run)
    return run


class PipelineCeleryRunLauncher(CeleryRunLauncher):
    """dagster-celery's run launcher (runs as Celery tasks on the `runs` queue), whose `terminate`
    marks the run CANCELING, as Dagster's own launchers do (upstream's only revokes the task, with
    a SIGTERM that Dagster turns into a retry of the running step). The run task interrupts its run
    while it is CANCELING (`run_worker.interrupted_while_canceling`); the revoke, without a
    signal, keeps a run that has not started yet from starting."""

    def terminate(self, run_id: str) -> bool:
        run = mark_canceling(self._instance, run_id)
        if run is None:
            return False
        task_id = run.tags.get(DAGSTER_CELERY_TASK_ID_TAG)
        if task_id:
            self.celery.AsyncResult(task_id).revoke()
        return True


# Where a preloaded run process runs: its host, pid and start time (a pid alone may be reused).
RUN_PROCESS_TAG = "call_pipeline/run_process"


class PreloadedRunLauncher(RunLauncher, ConfigurableClass):
    """The embedded default's run launcher: each run executes in a process of its own, forked from
    a server that has imported Dagster, the project and the SDKs already (multiprocessing's
    forkserver, started by the first launch, with the step processes' preload list).

    Dagster's `DefaultRunLauncher` asks the code server, which starts every run with `spawn`
    (`dagster/_grpc/server.py`): each run imports Dagster and the project again, about 3 s of CPU
    before its first step and the most of a small run's cost (README "Live campaigns"). Dagster has
    no launcher that forks, hence this one. What the operator gets stays Dagster's: a run is a
    process of its own (`dagster api execute_run`'s body, `run_worker.execute_run`); Terminate marks
    it CANCELING and the run process interrupts itself (`run_worker.interrupted_while_canceling`);
    run monitoring asks whether the process lives (`check_run_worker_health`), so a run whose
    process was killed is failed and retried.

    The runs execute the code the launching process (the daemon) has installed, not a code
    server's: both are the project's own environment in `serve`, `./run.sh ui` and the demo."""

    def __init__(self, inst_data: ConfigurableClassData | None = None) -> None:
        self._inst_data = inst_data
        self._lock = threading.Lock()
        self._processes: dict[str, Any] = {}
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    @classmethod
    def config_type(cls) -> dict:
        return {}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]
                          ) -> PreloadedRunLauncher:
        return cls(inst_data=inst_data)

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        if run.job_code_origin is None:
            raise ValueError(f"Run {run.run_id} has no code origin to execute.")
        forkserver = multiprocessing.get_context("forkserver")
        with self._lock:
            self._reap()
            forkserver.set_forkserver_preload(FORKSERVER_PRELOAD)
            process = forkserver.Process(target=_run_process, args=(self._instance.get_ref(), run.run_id),
                                         name=f"run-{run.run_id[:8]}")
            process.start()
            # Multiprocessing joins every child it knows of when the launching process exits: the
            # daemon would wait for its runs before it stops. A run is a process of its own, as
            # under Dagster's launcher, and goes on; this launcher reaps it (`_reap`).
            multiprocessing.process._children.discard(process)  # noqa: SLF001
            self._processes[run.run_id] = process
        started = psutil.Process(process.pid).create_time()
        self._instance.add_run_tags(run.run_id, {RUN_PROCESS_TAG: f"{socket.gethostname()}:{process.pid}:{started}"})

    def _reap(self) -> None:
        # A finished child's exit code must be read once, or its pipe stays open in the launcher.
        for run_id, process in list(self._processes.items()):
            if not process.is_alive():
                process.close()
                del self._processes[run_id]

    def terminate(self, run_id: str) -> bool:
        return mark_canceling(self._instance, run_id) is not None

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        where = run.tags.get(RUN_PROCESS_TAG)
        if where is None:
            return CheckRunHealthResult(WorkerStatus.UNKNOWN, "The run has no process yet.")
        host, pid, started = where.rsplit(":", 2)
        if host != socket.gethostname():
            return CheckRunHealthResult(WorkerStatus.UNKNOWN, f"The run's process is on {host}.")
        try:
            process = psutil.Process(int(pid))
            alive = process.status() != psutil.STATUS_ZOMBIE and abs(process.create_time() - float(started)) < 0.01
        except psutil.NoSuchProcess:
            alive = False
        if alive:
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        return CheckRunHealthResult(WorkerStatus.FAILED, f"The run's process (pid {pid} on {host}) is gone.")

    def dispose(self) -> None:
        # The runs go on: each is a process of its own, as with Dagster's launcher.
        with self._lock:
            self._reap()


def _run_process(instance_ref: InstanceRef, run_id: str) -> None:
    """The body of a run process forked by `PreloadedRunLauncher`: its exit code is the run's."""
    import sys

    with DagsterInstance.from_ref(instance_ref) as instance:
        run = instance.get_run_by_id(run_id)
        if run is not None:
            start_step_forkserver(run)
        code = execute_run(instance, run_id)
    sys.exit(code)


def create_pools(instance: DagsterInstance) -> None:
    """Gives each pool of the ops (the step queues) its row at the instance's default limit.
    Dagster creates that row when a run first claims a slot of the pool; on a new MySQL instance
    the first runs claim at once and race on that insert (seen: "Duplicate entry 'sync_queue'",
    the run failed). Called once, before the processes that launch runs start (`serve`)."""
    if instance.event_log_storage.supports_global_concurrency_limits:
        for pool in STEP_QUEUES:
            instance.event_log_storage.initialize_concurrency_limit_to_default(pool)
