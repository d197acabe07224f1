"""The forkserver's preload: the step processes it forks find the instance's storage imported."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from call_pipeline import forkserver_preload
from call_pipeline.executors import PRELOADED_MODULES, multiprocess_config

PROJECT = Path(__file__).resolve().parents[1]


def _home(tmp_path: Path, yaml: Path) -> str:
    shutil.copy(yaml, tmp_path / "dagster.yaml")
    return str(tmp_path)


def test_the_demo_instance_needs_the_sqlite_storage(tmp_path):
    modules = forkserver_preload.instance_storage_modules(_home(tmp_path, PROJECT / "dagster.yaml"))
    assert "dagster._core.storage.sqlite_storage" in modules
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
from call_pipeline_tests.forkserver_probe import imported
context = multiprocessing.get_context("forkserver")
context.set_forkserver_preload(sys.argv[1:])
queue = context.Queue()
modules = ["dagster._core.storage.sqlite_storage", "dagster._daemon", "upath"]
child = context.Process(target=imported, args=(queue, modules))
child.start()
print(queue.get(timeout=120))
child.join(timeout=60)
"""


def _forked_child_holds(tmp_path, preload: list[str]) -> str:
    env = {**os.environ, "DAGSTER_HOME": _home(tmp_path, PROJECT / "dagster.yaml")}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, *preload], cwd=PROJECT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_forked_step_process_starts_with_the_storage_imported(tmp_path):
    """The executor's own preload list: the step processes find the instance's storage imported."""
    assert multiprocess_config(2, 1)["start_method"]["forkserver"]["preload_modules"] == PRELOADED_MODULES
    assert _forked_child_holds(tmp_path, PRELOADED_MODULES) == "[True, True, True]"


def test_without_the_preload_a_forked_step_process_would_import_them_itself(tmp_path):
    """The probe itself imports none of them (so the test above can fail)."""
    assert _forked_child_holds(tmp_path, ["call_pipeline.definitions"]) == "[False, False, False]"
