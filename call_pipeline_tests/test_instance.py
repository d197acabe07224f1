"""The two instance files: `dagster.yaml` (one machine: `ui`, the demo's settings) and
`deploy/dagster.yaml` (production). Dagster has no include, so what both must hold is checked here."""

from __future__ import annotations

import shutil

import dagster as dg
import yaml
from dagster import DagsterInstance
from dagster._core.instance.ref import InstanceRef

from call_pipeline.crm.database import PROJECT_ROOT

FILES = {"one machine": PROJECT_ROOT / "dagster.yaml", "production": PROJECT_ROOT / "deploy" / "dagster.yaml"}
SHARED = ("run_retries", "run_monitoring", "python_logs", "telemetry")


def _load(name: str) -> dict:
    return yaml.safe_load(FILES[name].read_text(encoding="utf-8"))


def test_both_files_hold_the_same_run_rules():
    one, prod = _load("one machine"), _load("production")
    for key in SHARED:
        assert one[key] == prod[key], key
    # one queued-or-running run per task, whoever launched it, and the same pool default
    assert one["concurrency"]["runs"]["tag_concurrency_limits"] == prod["concurrency"]["runs"]["tag_concurrency_limits"]
    assert one["concurrency"]["pools"] == prod["concurrency"]["pools"]
    # what only production has: shared MySQL storage and the daemon's queue
    assert "mysql" in prod["storage"] and "storage" not in one
    assert prod["run_coordinator"]["class"] == "QueuedRunCoordinator"


def test_a_run_prints_info_and_up(tmp_path, capfd):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(FILES["one machine"], home / "dagster.yaml")

    @dg.op
    def talk(context) -> None:
        context.log.debug("debug line of the op")
        context.log.info("info line of the op")

    @dg.job
    def quiet() -> None:
        talk()

    with DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        assert quiet.execute_in_process(instance=instance).success
    err = capfd.readouterr().err
    assert "info line of the op" in err and "STEP_SUCCESS" not in err
    assert "debug line of the op" not in err and " - DEBUG - " not in err


def test_production_runs_are_celery_tasks_on_the_queue_the_run_workers_listen_to():
    """deploy/dagster.yaml's launcher sends runs to the queue `call-pipeline worker --queues runs`
    consumes, on the broker and backend the workers use (the same settings, from the environment)."""
    from call_pipeline.celery_app import app
    from call_pipeline.queues import RUNS_QUEUE, WORKER_QUEUES
    from call_pipeline.settings import PipelineSettings, env_name

    launcher = _load("production")["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_celery.launcher", "CeleryRunLauncher")
    assert launcher["config"]["default_queue"] == RUNS_QUEUE and RUNS_QUEUE in WORKER_QUEUES
    assert launcher["config"]["broker"] == {"env": env_name(PipelineSettings, "celery_broker")}
    assert launcher["config"]["backend"] == {"env": env_name(PipelineSettings, "celery_backend")}
    assert RUNS_QUEUE in {queue.name for queue in app.conf.task_queues}
    assert "execute_job" in app.tasks and "resume_job" in app.tasks
