"""The embedded default's storage (call_pipeline/storage.py): Dagster's SQLite files, one engine per
database file, safe across threads and a fork."""

from __future__ import annotations

import contextlib
import multiprocessing
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml
from dagster import DagsterInstance
from dagster._core.instance.ref import InstanceRef
from sqlalchemy.engine import Engine

from call_pipeline import storage
from call_pipeline.crm.database import PROJECT_ROOT


@dg.op
def talk(context) -> int:
    context.log.info("said once")
    return 1


@dg.job
def chatty() -> None:
    talk()


def _home(path: Path, yaml_text: str | None = None) -> str:
    path.mkdir(exist_ok=True)
    if yaml_text is None:
        shutil.copy(PROJECT_ROOT / "dagster.yaml", path / "dagster.yaml")
    else:
        (path / "dagster.yaml").write_text(yaml_text, encoding="utf-8")
    return str(path)


def _open(home: str) -> DagsterInstance:
    return DagsterInstance.from_ref(InstanceRef.from_dir(home))


def test_the_project_instance_keeps_dagsters_files_and_dagster_reads_them(tmp_path):
    home = _home(tmp_path / "home")
    with _open(home) as instance:
        assert isinstance(instance.run_storage, storage.SqliteRunStorage)
        assert isinstance(instance.event_log_storage, storage.SqliteEventLogStorage)
        assert isinstance(instance.schedule_storage, storage.SqliteScheduleStorage)
        run_id = chatty.execute_in_process(instance=instance).run_id
    assert (tmp_path / "home" / "history" / "runs.db").is_file()
    assert (tmp_path / "home" / "history" / "runs" / f"{run_id}.db").is_file()
    assert (tmp_path / "home" / "schedules" / "schedules.db").is_file()

    # The same home opened by Dagster's own instance (a home from before this storage, or after it)
    plain = _home(tmp_path / "home", yaml.safe_dump({"telemetry": {"enabled": False}}))
    with _open(plain) as instance:
        assert type(instance.run_storage).__module__.startswith("dagster.")
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS
        messages = [record.event_log_entry.user_message for record in instance.get_records_for_run(run_id).records]
        assert "said once" in messages


def test_a_storage_setting_in_the_file_is_kept(tmp_path):
    text = (PROJECT_ROOT / "dagster.yaml").read_text(encoding="utf-8")
    data = {**yaml.safe_load(text), "storage": {"sqlite": {"base_dir": str(tmp_path / "elsewhere")}}}
    with _open(_home(tmp_path / "home", yaml.safe_dump(data))) as instance:
        assert type(instance.run_storage).__module__.startswith("dagster.")
        assert chatty.execute_in_process(instance=instance).success
    assert (tmp_path / "elsewhere" / "history" / "runs.db").is_file()


def test_every_connection_of_a_database_file_uses_one_engine(tmp_path):
    with _open(_home(tmp_path / "home")) as instance:
        run_id = chatty.execute_in_process(instance=instance).run_id
        runs, events = instance.run_storage, instance.event_log_storage
        with runs.connect() as first, runs.connect() as second:
            assert first.engine is second.engine
            assert first.connection.dbapi_connection is not second.connection.dbapi_connection
        with instance.schedule_storage.connect() as first, instance.schedule_storage.connect() as second:
            assert first.engine is second.engine
        with events.run_connection(run_id) as first:
            engine = first.engine
        # one event log connection at a time, as Dagster's storage holds its lock for each
        with events.run_connection(run_id) as again:
            assert again.engine is engine
        with events.index_connection() as index:
            assert index.engine is not engine


def _dbapi_connection(storage_connect) -> int:
    with storage_connect() as conn:
        return id(conn.connection.dbapi_connection)


def test_a_connection_is_kept_for_the_next_query_of_its_database_but_a_runs_own(tmp_path):
    """A new SQLite connection reads the schema again; each database's engine keeps its connections,
    but a run's own event database, which the webserver follows by watching its file."""
    with _open(_home(tmp_path / "home")) as instance:
        run_id = chatty.execute_in_process(instance=instance).run_id
        events = instance.event_log_storage
        for connect in (instance.run_storage.connect, instance.schedule_storage.connect, events.index_connection):
            assert _dbapi_connection(connect) == _dbapi_connection(connect)
        with events.run_connection(run_id) as first:
            dbapi = first.connection.dbapi_connection
        with pytest.raises(sqlite3.ProgrammingError):  # closed when given back
            dbapi.execute("SELECT 1")


def _write_an_event(home: str, run_id: str) -> None:
    with _open(home) as instance:
        instance.report_engine_event("written by another process", instance.get_run_by_id(run_id))


def test_a_watcher_of_a_run_sees_the_events_another_process_writes(tmp_path):
    """What the webserver's run page does (Dagster's watchdog on the run's database file): a
    connection kept to that database by the reader would keep the file from changing."""
    home = _home(tmp_path / "home")
    with _open(home) as instance:
        run_id = chatty.execute_in_process(instance=instance).run_id
        records = instance.get_records_for_run(run_id)  # the reader has used the run's database
        seen = threading.Event()

        def callback(event, cursor) -> None:
            if event.dagster_event is not None and event.dagster_event.message == "written by another process":
                seen.set()

        instance.event_log_storage.watch(run_id, records.cursor, callback)
        try:
            child = multiprocessing.get_context("fork").Process(target=_write_an_event, args=(home, run_id))
            child.start()
            child.join(60)
            assert child.exitcode == 0
            assert seen.wait(30), "the watcher never saw the event"
        finally:
            instance.event_log_storage.end_watch(run_id, callback)


def _child_connection(connect, answer) -> None:
    answer.send(_dbapi_connection(connect))


def test_a_forked_process_opens_connections_of_its_own(tmp_path):
    with _open(_home(tmp_path / "home")) as instance:
        chatty.execute_in_process(instance=instance)
        events = instance.event_log_storage
        fork = multiprocessing.get_context("fork")
        for connect in (instance.run_storage.connect, instance.schedule_storage.connect, events.index_connection):
            kept = _dbapi_connection(connect)  # pooled in this process before the fork
            ours, theirs = fork.Pipe()
            child = fork.Process(target=_child_connection, args=(connect, theirs))
            child.start()
            assert ours.poll(60)
            assert ours.recv() != kept  # the parent's connection, copied into the child, is not used there
            child.join(60)
            assert child.exitcode == 0
            assert _dbapi_connection(connect) == kept  # nor closed under the parent


def test_a_run_stored_after_a_wipe_is_read_by_another_process(tmp_path):
    """Dagster's wipe deletes the runs' database files: a connection kept to one would write where no
    other process reads."""
    home = _home(tmp_path / "home")
    with _open(home) as instance:
        run_id = chatty.execute_in_process(instance=instance).run_id
        instance.wipe()
        assert instance.get_runs() == []
        again = chatty.execute_in_process(instance=instance, run_id=run_id).run_id
    with _open(home) as other:
        assert other.get_run_by_id(again).status == dg.DagsterRunStatus.SUCCESS
        assert "said once" in [r.event_log_entry.user_message for r in other.get_records_for_run(again).records]


def test_instances_opened_on_one_home_in_one_process_share_its_connections(tmp_path):
    """Dagster's code server opens an instance for every sensor tick: its storages find the
    engines, their connections and their compiled statements there."""
    home = _home(tmp_path / "home")
    with _open(home) as first:
        run_id = chatty.execute_in_process(instance=first).run_id
        kept = [_dbapi_connection(first.run_storage.connect), _dbapi_connection(first.schedule_storage.connect),
                _dbapi_connection(first.event_log_storage.index_connection)]
    with _open(home) as second:
        assert [_dbapi_connection(second.run_storage.connect), _dbapi_connection(second.schedule_storage.connect),
                _dbapi_connection(second.event_log_storage.index_connection)] == kept
        assert second.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS


def test_the_event_log_keeps_the_engines_of_its_latest_databases_only(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "_ENGINES", storage.Engines(3))
    with _open(_home(tmp_path / "home")) as instance:
        events = instance.event_log_storage
        engines = {}
        for run_id in ("a", "b", "c", "d"):
            with events.run_connection(run_id) as conn:
                engines[run_id] = conn.engine
        with events.run_connection("d") as conn:
            assert conn.engine is engines["d"]
        with events.run_connection("a") as conn:
            assert conn.engine is not engines["a"]  # dropped when "d" came


def test_runs_written_from_threads_and_a_forked_process_are_all_stored(tmp_path):
    home = _home(tmp_path / "home")
    with _open(home) as instance:
        chatty.execute_in_process(instance=instance)  # the engines exist before the threads and the fork
        errors: list[BaseException] = []

        def run() -> None:
            try:
                chatty.execute_in_process(instance=instance)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # forked once the threads have ended, as a fork beside running threads may copy a held lock
        child = multiprocessing.get_context("fork").Process(target=chatty.execute_in_process,
                                                            kwargs={"instance": instance})
        child.start()
        child.join(60)
        assert errors == []
        assert child.exitcode == 0
        runs = instance.get_runs()
        assert len(runs) == 6
        assert {run.status for run in runs} == {dg.DagsterRunStatus.SUCCESS}
        for run in runs:
            assert "said once" in [r.event_log_entry.user_message
                                   for r in instance.get_records_for_run(run.run_id).records]


def test_a_database_dagster_made_is_opened_without_loading_the_migration_scripts(tmp_path, monkeypatch):
    from alembic.script import ScriptDirectory

    home = _home(tmp_path / "home")
    with _open(home) as instance:  # a new home: Dagster's code creates and stamps each database
        run_id = chatty.execute_in_process(instance=instance).run_id
    loaded = []
    real = ScriptDirectory.from_config.__func__
    monkeypatch.setattr(ScriptDirectory, "from_config",
                        classmethod(lambda cls, config, *a: loaded.append(config) or real(cls, config, *a)))
    storage._event_log_scripts.cache_clear()
    with _open(home) as instance:
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS
        assert "said once" in [r.event_log_entry.user_message for r in instance.get_records_for_run(run_id).records]
        assert instance.get_ticks("origin", "selector") == []
        assert loaded == []
        for _ in range(3):  # new runs' databases: the scripts loaded for the first only
            chatty.execute_in_process(instance=instance)
        assert len(loaded) == 1


def _shape(path: Path) -> dict:
    """What a database is made of: its tables' and indexes' SQL, its journal mode, its revision."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {"schema": sorted(conn.execute("SELECT type, name, sql FROM sqlite_master").fetchall(), key=str),
                "journal": conn.execute("PRAGMA journal_mode").fetchone()[0],
                "revision": conn.execute("SELECT version_num FROM alembic_version").fetchall()}


def test_a_new_run_database_is_made_as_dagster_makes_it(tmp_path):
    from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
        SqliteEventLogStorage as DagsterSqliteEventLogStorage,
    )

    ours = storage.SqliteEventLogStorage(str(tmp_path / "ours"))
    theirs = DagsterSqliteEventLogStorage(str(tmp_path / "theirs"))
    for events in (ours, theirs):
        with events.run_connection("a-run"):
            pass
        events.dispose()
    made = _shape(tmp_path / "ours" / "a-run.db")
    assert made == _shape(tmp_path / "theirs" / "a-run.db")
    assert made["journal"] == "wal"
    assert len(made["revision"]) == 1


def test_a_database_being_made_by_another_process_is_left_to_dagsters_code(tmp_path):
    """A database that is not empty when a run's first event comes (another process is making it)
    is not made again here: Dagster's `_initdb`, which waits for the other process, decides."""
    path = tmp_path / "runs" / "a-run.db"
    path.parent.mkdir()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE event_logs (id INTEGER PRIMARY KEY)")
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        assert storage._made_stamped(engine) is False
    finally:
        engine.dispose()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("event_logs",)]


def test_a_database_file_without_dagsters_tables_is_made_by_dagsters_code(tmp_path):
    home = tmp_path / "home"
    (home / "history" / "runs").mkdir(parents=True)
    (home / "schedules").mkdir()
    for empty in ("history/runs.db", "history/runs/index.db", "schedules/schedules.db"):
        (home / empty).touch()
    with _open(_home(home)) as instance:
        assert chatty.execute_in_process(instance=instance).success
        assert instance.get_runs_count() == 1
        assert instance.get_ticks("origin", "selector") == []


@contextlib.contextmanager
def _statements() -> Iterator[list[str]]:
    """Every SQL statement any engine executes meanwhile."""
    seen: list[str] = []

    def record(conn, cursor, statement, *args) -> None:
        seen.append(statement)

    sa.event.listen(Engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(Engine, "before_cursor_execute", record)


def test_a_schema_check_that_answered_yes_is_not_asked_again_and_a_no_is(tmp_path, monkeypatch):
    """Dagster's run queue and sensors ask the same schema questions on every query; a schema only
    gains tables and columns, so a yes is kept and a no asked again."""
    home = _home(tmp_path / "home")
    _open(home).dispose()  # Dagster makes the databases
    monkeypatch.setattr(storage, "_SCHEMA_SEEN", set())  # what opening the home asked is forgotten
    runs = storage.SqliteRunStorage.from_local(str(tmp_path / "home" / "history"))
    schedules = storage.SqliteScheduleStorage.from_local(str(tmp_path / "home" / "schedules"))
    events = storage.SqliteEventLogStorage(str(tmp_path / "home" / "history" / "runs"))
    checks = {"runs table columns": runs.has_run_stats_index_cols,
              "run data migration": lambda: runs.has_built_index("run_partitions"),
              "instigators table": schedules.has_instigators_table,
              "secondary indexes table": schedules.has_secondary_index_table,
              "event log table": lambda: events.has_table("dynamic_partitions"),
              "asset key column": lambda: events.has_asset_key_col("last_materialization_timestamp")}
    for name, check in checks.items():
        with _statements() as first:
            assert check() is True, name
        with _statements() as again:
            assert check() is True, name
        assert first, name
        assert again == [], (name, again)
    for _ in range(2):
        with _statements() as asked:
            assert events.has_table("no_such_table") is False
        assert asked
    events.dispose()
    # what depends on the checks still works: the run queue's query, the sensors' states
    with _open(home) as instance:
        assert instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED])) == []
        assert instance.all_instigator_state() == []
