"""What a process keeps of the instance's MySQL storage (`instance.keep_connections`): the `runs`
workers' processes, the daemon, the code server."""

from __future__ import annotations

import subprocess
import sys
import threading

import dagster as dg
import sqlalchemy as sa
import yaml

from call_pipeline import instance as instance_module


def _mysql_home(env: dict, home) -> str:
    (home / "dagster.yaml").write_text(yaml.safe_dump({
        "instance_class": {"module": "call_pipeline.instance", "class": "PipelineInstance"},
        "storage": {"mysql": {"mysql_db": {
            "hostname": env["DAGSTER_MYSQL_HOST"], "port": int(env["DAGSTER_MYSQL_PORT"]),
            "username": env["DAGSTER_MYSQL_USER"], "password": env["DAGSTER_MYSQL_PASSWORD"],
            "db_name": env["DAGSTER_MYSQL_DB"]}}}}), encoding="utf-8")
    return str(home)


def _kept_after_eight_at_once(instance: dg.DagsterInstance) -> list[int]:
    """Eight threads use each storage's engine at once; then the connections each engine kept."""
    engines = [s._engine for s in (instance.run_storage, instance.event_log_storage,  # noqa: SLF001
                                   instance.schedule_storage)]
    together = threading.Barrier(8)

    def write() -> None:
        for engine in engines:
            with engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
                together.wait(timeout=30)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return [engine.pool.checkedin() if isinstance(engine.pool, sa.QueuePool) else 0 for engine in engines]


def test_a_threads_pool_process_keeps_as_many_storage_connections_as_it_is_given(dagster_mysql_env, tmp_path):
    """Eight runs' threads write at once: with `keep_connections(4)` each MySQL storage keeps four
    of the connections they opened (Dagster's `optimize_for_webserver` alone keeps one, and every
    other write opens and closes a connection of its own)."""
    home = _mysql_home(dagster_mysql_env, tmp_path)

    def kept(size: int | None) -> list[int]:
        instance = dg.DagsterInstance.from_config(home)
        try:
            instance.optimize_for_webserver(15000, 3600, -1)
            if size is not None:
                instance_module.keep_connections(instance, size)
            return _kept_after_eight_at_once(instance)
        finally:
            instance.dispose()

    assert kept(None) == [1, 1, 1]
    assert kept(4) == [4, 4, 4]


def test_the_daemons_instance_keeps_connections_to_each_mysql_storage(dagster_mysql_env, tmp_path, monkeypatch):
    """The daemon's threads query all the time; Dagster's MySQL storage connects for every query."""
    home = _mysql_home(dagster_mysql_env, tmp_path)
    monkeypatch.setattr(instance_module.PipelineInstance, "kept_connections", 0)  # restored after the test
    instance = dg.DagsterInstance.from_config(home)
    try:
        assert _kept_after_eight_at_once(instance) == [0, 0, 0]  # Dagster's: none kept (NullPool)
    finally:
        instance.dispose()
    instance_module.keep_connections_in_this_process()  # what `python -m call_pipeline.daemon` does first
    instance = dg.DagsterInstance.from_config(home)
    try:
        assert isinstance(instance, instance_module.PipelineInstance)
        assert _kept_after_eight_at_once(instance) == [instance_module.KEPT_CONNECTIONS] * 3
        assert instance.get_runs_count() == 0
    finally:
        instance.dispose()


def test_instances_opened_one_after_another_in_a_process_use_its_kept_connections(dagster_mysql_env, tmp_path,
                                                                                  monkeypatch):
    """Dagster's code server opens an instance for every sensor tick: each finds the connections the
    one before kept."""
    home = _mysql_home(dagster_mysql_env, tmp_path)
    monkeypatch.setattr(instance_module.PipelineInstance, "kept_connections", instance_module.KEPT_CONNECTIONS)
    seen = []
    for _ in range(3):
        instance = dg.DagsterInstance.from_config(home)
        try:
            instance.get_runs_count()
            with instance.run_storage.connect() as conn:
                seen.append(id(conn.connection.dbapi_connection))
        finally:
            instance.dispose()
    assert len(set(seen)) == 1


def test_a_process_that_loads_the_definitions_keeps_its_connections():
    """The code server, and every run, step and worker process: they load the definitions."""
    code = ("import call_pipeline.definitions; from call_pipeline.instance import PipelineInstance; "
            "print(PipelineInstance.kept_connections)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split()[-1] == "1"  # one per storage, as Dagster's webserver keeps
