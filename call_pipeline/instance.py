"""The production deployment's instance class (`instance_class` in deploy/dagster.yaml) and run
launcher (`run_launcher`), and the pools every instance holds before its first run.

The instance class differs from Dagster's own in one thing: starting a run does not reconfigure the process's
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

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from dagster._core.instance import DagsterInstance
from dagster._core.instance.ref import InstanceRef
from dagster_celery.launcher import CeleryRunLauncher
from dagster_celery.tags import DAGSTER_CELERY_TASK_ID_TAG

from call_pipeline.queues import STEP_QUEUES

_CONFIGURING = threading.Lock()


class PipelineInstance(DagsterInstance):
    """Dagster's instance; runs started side by side in one process do not reconfigure logging."""

    # What Dagster asks of an `instance_class`: no settings of its own, Dagster's defaults.
    @classmethod
    def config_schema(cls) -> Mapping[str, Any]:
        return {}

    @staticmethod
    def config_defaults(base_dir: str) -> Mapping[str, Any]:
        return InstanceRef.config_defaults(base_dir)

    def get_yaml_python_handlers(self) -> Sequence[logging.Handler]:
        if not self.get_python_log_dagster_handler_config():
            return []
        with _CONFIGURING:
            return super().get_yaml_python_handlers()


class PipelineCeleryRunLauncher(CeleryRunLauncher):
    """dagster-celery's run launcher (runs as Celery tasks on the `runs` queue), whose `terminate`
    marks the run CANCELING, as Dagster's own launchers do (upstream's only revokes the task, with
    a SIGTERM that Dagster turns into a retry of the running step). The run task interrupts its run
    while it is CANCELING (`celery_app.interrupted_while_canceling`); the revoke, without a
    signal, keeps a run that has not started yet from starting."""

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return False
        self._instance.report_run_canceling(run)
        task_id = run.tags.get(DAGSTER_CELERY_TASK_ID_TAG)
        if task_id:
            self.celery.AsyncResult(task_id).revoke()
        return True


def create_pools(instance: DagsterInstance) -> None:
    """Gives each pool of the ops (the step queues) its row at the instance's default limit.
    Dagster creates that row when a run first claims a slot of the pool; on a new MySQL instance
    the first runs claim at once and race on that insert (seen: "Duplicate entry 'sync_queue'",
    the run failed). Called once, before the processes that launch runs start (`serve`)."""
    if instance.event_log_storage.supports_global_concurrency_limits:
        for pool in STEP_QUEUES:
            instance.event_log_storage.initialize_concurrency_limit_to_default(pool)
