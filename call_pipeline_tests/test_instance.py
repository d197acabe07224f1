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
SHARED = ("instance_class", "run_retries", "run_monitoring", "python_logs", "auto_materialize", "freshness",
          "telemetry")


def _load(name: str) -> dict:
    return yaml.safe_load(FILES[name].read_text(encoding="utf-8"))


def test_both_files_hold_the_same_run_rules():
    one, prod = _load("one machine"), _load("production")
    for key in SHARED:
        assert one[key] == prod[key], key
    # one queued-or-running run per task, whoever launched it
    assert one["concurrency"]["runs"]["tag_concurrency_limits"] == prod["concurrency"]["runs"]["tag_concurrency_limits"]
    # production's runs execute in process, one step at a time: its pools never hold back a run
    # that has a run slot (one machine's bound the steps of the multiprocess executor)
    assert prod["concurrency"]["pools"]["default_limit"] >= prod["concurrency"]["runs"]["max_concurrent_runs"]
    assert one["concurrency"]["pools"]["default_limit"] == 4
    # what only production has: shared MySQL storage and the daemon's queue
    assert "mysql" in prod["storage"] and "storage" not in one
    assert prod["run_coordinator"]["class"] == "QueuedRunCoordinator"


def test_the_daemon_runs_only_the_threads_the_project_uses(tmp_path):
    """No asset has an automation condition or a freshness policy: the asset and freshness daemons
    would only read the instance every few seconds."""
    for name in FILES:
        home = tmp_path / name.replace(" ", "_")
        home.mkdir()
        text = FILES[name].read_text(encoding="utf-8")
        if name == "production":  # its MySQL storage is not opened here: the daemons depend on the rest
            config = yaml.safe_load(text)
            config.pop("storage")
            text = yaml.safe_dump(config)
        (home / "dagster.yaml").write_text(text, encoding="utf-8")
        with DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
            assert sorted(instance.get_required_daemon_types()) == sorted([
                "SENSOR", "BACKFILL", "SCHEDULER", "QUEUED_RUN_COORDINATOR", "MONITORING", "EVENT_LOG_CONSUMER"]), name


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
    from dagster_celery.launcher import CeleryRunLauncher

    from call_pipeline.celery_app import app
    from call_pipeline.instance import PipelineCeleryRunLauncher
    from call_pipeline.queues import RUNS_QUEUE, WORKER_QUEUES
    from call_pipeline.settings import PipelineSettings, env_name

    launcher = _load("production")["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("call_pipeline.instance", "PipelineCeleryRunLauncher")
    assert issubclass(PipelineCeleryRunLauncher, CeleryRunLauncher)
    assert launcher["config"]["default_queue"] == RUNS_QUEUE and RUNS_QUEUE in WORKER_QUEUES
    assert launcher["config"]["broker"] == {"env": env_name(PipelineSettings, "celery_broker")}
    assert launcher["config"]["backend"] == {"env": env_name(PipelineSettings, "celery_backend")}
    assert RUNS_QUEUE in {queue.name for queue in app.conf.task_queues}
    assert "execute_job" in app.tasks and "resume_job" in app.tasks


def _dict_config_calls(monkeypatch) -> list[dict]:
    import logging.config

    calls: list[dict] = []
    real = logging.config.dictConfig
    monkeypatch.setattr(logging.config, "dictConfig", lambda config: (calls.append(config), real(config))[1])
    return calls


def _home_with(tmp_path, name: str, text: str):
    home = tmp_path / name
    home.mkdir()
    (home / "dagster.yaml").write_text(text, encoding="utf-8")
    return InstanceRef.from_dir(str(home))


def test_production_instance_starts_a_run_without_reconfiguring_logging(tmp_path, monkeypatch):
    """A run's log manager asks the instance for its handlers; Dagster's own instance calls
    logging.config.dictConfig for it every time, which with runs side by side in one process (the
    run workers' threads pool) deadlocks against a run that is inside a handler. The production
    instance class skips it when no handlers are configured, and still configures them when they are."""
    from call_pipeline.instance import PipelineInstance

    instance_class = _load("production")["instance_class"]
    assert (instance_class["module"], instance_class["class"]) == ("call_pipeline.instance", "PipelineInstance")
    section = f"instance_class:\n  module: {instance_class['module']}\n  class: {instance_class['class']}\n"
    logs = "python_logs:\n  python_log_level: INFO\n"

    calls = _dict_config_calls(monkeypatch)
    with DagsterInstance.from_ref(_home_with(tmp_path, "plain", logs)) as plain:
        assert type(plain) is DagsterInstance
        plain.get_handlers()
    assert len(calls) == 1  # the control: Dagster's instance reconfigures logging for a run

    calls.clear()
    with DagsterInstance.from_ref(_home_with(tmp_path, "production", section + logs)) as production:
        assert isinstance(production, PipelineInstance)
        handlers = production.get_handlers()
        assert calls == [] and len(handlers) == 1  # the event log's handler only

    handler_config = ("  dagster_handler_config:\n    handlers:\n      out:\n"
                      "        class: logging.StreamHandler\n        level: INFO\n")
    with DagsterInstance.from_ref(_home_with(tmp_path, "handlers", section + logs + handler_config)) as configured:
        handlers = configured.get_handlers()
    assert len(calls) == 1 and any(type(h).__name__ == "StreamHandler" for h in handlers)
