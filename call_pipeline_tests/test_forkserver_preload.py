"""The forkserver's preload: the step processes it forks find the instance's storage imported."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from call_pipeline import forkserver_preload
from call_pipeline.executors import FORKSERVER_PRELOAD, PRELOADED_MODULES, multiprocess_config, runs_sync_job

PROJECT = Path(__file__).resolve().parents[1]


def _home(tmp_path: Path, yaml: Path) -> str:
    shutil.copy(yaml, tmp_path / "dagster.yaml")
    return str(tmp_path)


def test_the_demo_instance_needs_the_projects_sqlite_storage(tmp_path):
    modules = forkserver_preload.instance_storage_modules(_home(tmp_path, PROJECT / "dagster.yaml"))
    assert "call_pipeline.storage" in modules
    assert "dagster_mysql" not in modules


def test_the_production_instance_needs_the_mysql_storage(tmp_path, monkeypatch):
    for name, value in {"DAGSTER_MYSQL_HOST": "127.0.0.1", "DAGSTER_MYSQL_PORT": "3306", "DAGSTER_MYSQL_USER": "root",
                        "DAGSTER_MYSQL_PASSWORD": "", "DAGSTER_MYSQL_DB": "dagster"}.items():
        monkeypatch.setenv(name, value)
    modules = forkserver_preload.instance_storage_modules(_home(tmp_path, PROJECT / "deploy" / "dagster.yaml"))
    assert "dagster_mysql" in modules


def test_no_instance_file_means_only_the_common_modules(tmp_path):
    assert forkserver_preload.instance_storage_modules(str(tmp_path)) == []
    assert forkserver_preload.instance_storage_modules(None) == []


def test_a_broken_instance_file_is_logged_and_never_raised(tmp_path, monkeypatch, caplog):
    (tmp_path / "dagster.yaml").write_text("storage: [this is: not, a storage\n")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    assert forkserver_preload.preload() == []
    assert "cannot read the instance" in caplog.text


def test_a_module_that_cannot_be_imported_is_reported(monkeypatch, caplog):
    monkeypatch.setattr(forkserver_preload, "_ALWAYS", ("call_pipeline.no_such_module",))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert forkserver_preload.preload() == ["call_pipeline.no_such_module"]
    assert "cannot import call_pipeline.no_such_module" in caplog.text


# Run in a process of its own, with a forkserver of its own: the probe's module imports nothing
# but the standard library, so what the forked child holds came from the preload.
_SCRIPT = """
import multiprocessing, sys
from call_pipeline_tests import forkserver_probe
context = multiprocessing.get_context("forkserver")
context.set_forkserver_preload(sys.argv[2:])
queue = context.Queue()
child = context.Process(target=getattr(forkserver_probe, sys.argv[1]), args=(queue,))
child.start()
print(queue.get(timeout=120))
child.join(timeout=60)
"""


def _forked_child(tmp_path, preload: list[str], probe: str = "storage_imported") -> str:
    """What `probe` (in forkserver_probe) finds in a child forked from a forkserver with `preload`."""
    env = {**os.environ, "DAGSTER_HOME": _home(tmp_path, PROJECT / "dagster.yaml")}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, probe, *preload], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_forked_step_process_starts_with_the_storage_imported(tmp_path):
    """The executor's own preload list: the step processes find the instance's storage imported."""
    assert multiprocess_config(2, 1)["start_method"]["forkserver"]["preload_modules"] == PRELOADED_MODULES
    assert _forked_child(tmp_path, PRELOADED_MODULES) == "[True, True, True]"


def test_without_the_preload_a_forked_step_process_would_import_them_itself(tmp_path):
    """The probe itself imports none of them (so the test above can fail)."""
    assert _forked_child(tmp_path, ["call_pipeline.definitions"]) == "[False, False, False]"


def test_a_forked_run_process_opens_its_instance_without_importing_anything(tmp_path):
    """The run launcher's forkserver (the same preload): a run process that opens the instance
    imports no module on the way (Dagster's per-project state store under the instance's home
    imports `upath.core` and fsspec lazily: opening the instance cost 105 ms of CPU, 45 ms with them
    preloaded)."""
    assert _forked_child(tmp_path, FORKSERVER_PRELOAD, "modules_imported_opening_the_instance") == "[]"


def test_without_the_preload_opening_the_instance_would_import_modules(tmp_path):
    found = _forked_child(tmp_path, ["call_pipeline.definitions"], "modules_imported_opening_the_instance")
    assert "'upath.core'" in found, found


def _execute_run_argv(job_name: str, instance_ref=None, run_id: str = "r1") -> list[str]:
    """A run worker's command line, as the default run launcher builds it."""
    from dagster import serialize_value
    from dagster._core.code_pointer import ModuleCodePointer
    from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
    from dagster._grpc.types import ExecuteRunArgs

    origin = JobPythonOrigin(job_name, RepositoryPythonOrigin(
        sys.executable, ModuleCodePointer("call_pipeline.definitions", "defs", str(PROJECT))))
    args = ExecuteRunArgs(job_origin=origin, run_id=run_id, instance_ref=instance_ref, set_exit_code_on_failure=True)
    return ["dagster/__main__.py", "api", "execute_run", serialize_value(args)]


def test_the_run_worker_of_the_sync_job_is_told_apart():
    from call_pipeline.jobs import sync_call_task
    from call_pipeline.run_status import SYNC_JOB_NAME

    assert sync_call_task.name == SYNC_JOB_NAME
    assert runs_sync_job(_execute_run_argv("sync_call_task"))
    assert not runs_sync_job(_execute_run_argv("advance_task_states"))
    assert not runs_sync_job(["dagster/__main__.py", "api", "execute_run"])
    assert not runs_sync_job(["dagster/__main__.py", "api", "execute_run", "{not json"])
    assert not runs_sync_job(["dagster-webserver", "-m", "call_pipeline.definitions"])


# A run worker imports the project (sys.argv set as the launcher sets it): is its forkserver
# running before any step, and does a process it forks hold the project and the storage?
_WORKER_SCRIPT = """
import json, multiprocessing, sys
sys.argv = json.loads(sys.argv[1])
import call_pipeline.definitions
import multiprocessing.forkserver
from call_pipeline_tests.forkserver_probe import imported
if multiprocessing.forkserver._forkserver._forkserver_pid is None:
    print("no forkserver")
    raise SystemExit
context = multiprocessing.get_context("forkserver")
queue = context.Queue()
child = context.Process(target=imported, args=(queue, ["call_pipeline.definitions",
                                                       "dagster._core.storage.sqlite_storage"]))
child.start()
print(queue.get(timeout=120))
child.join(timeout=60)
"""


def _run_worker(tmp_path, argv: list[str], executor: str = "multiprocess") -> str:
    import json

    home = tmp_path if (tmp_path / "dagster.yaml").exists() else _home(tmp_path, PROJECT / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "CALL_PIPELINE_EXECUTOR": executor}
    done = subprocess.run([sys.executable, "-c", _WORKER_SCRIPT, json.dumps(argv)], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_sync_run_worker_starts_its_forkserver_as_it_imports_the_project(tmp_path):
    assert _run_worker(tmp_path, _execute_run_argv("sync_call_task")) == "[True, True]"


def test_other_processes_leave_the_forkserver_to_dagster(tmp_path):
    assert _run_worker(tmp_path, _execute_run_argv("advance_task_states")) == "no forkserver"
    assert _run_worker(tmp_path, ["dagster-webserver", "-m", "call_pipeline.definitions"]) == "no forkserver"
    assert _run_worker(tmp_path, _execute_run_argv("sync_call_task"), executor="in_process") == "no forkserver"


def test_a_run_asked_to_run_in_process_starts_no_forkserver(tmp_path):
    """The sensor's small runs (IN_PROCESS_RUN_CONFIG) need no step processes; other runs of the
    same instance still get their forkserver early."""
    from dagster import DagsterInstance, DagsterRun
    from dagster._core.instance.ref import InstanceRef

    from call_pipeline.executors import IN_PROCESS_RUN_CONFIG

    ref = InstanceRef.from_dir(_home(tmp_path, PROJECT / "dagster.yaml"))
    with DagsterInstance.from_ref(ref) as instance:
        instance.add_run(DagsterRun(job_name="sync_call_task", run_id="small", run_config=IN_PROCESS_RUN_CONFIG))
        instance.add_run(DagsterRun(job_name="sync_call_task", run_id="big", run_config={}))
    assert _run_worker(tmp_path, _execute_run_argv("sync_call_task", ref, "small")) == "no forkserver"
    assert _run_worker(tmp_path, _execute_run_argv("sync_call_task", ref, "big")) == "[True, True]"


def test_a_forked_step_process_finds_the_crm_ssl_context_built(tmp_path):
    assert _forked_child(tmp_path, PRELOADED_MODULES, "ssl_context_built") == "True"


def test_without_the_preload_the_ssl_context_is_left_to_each_step_process(tmp_path):
    assert _forked_child(tmp_path, ["call_pipeline.definitions"], "ssl_context_built") == "False"
