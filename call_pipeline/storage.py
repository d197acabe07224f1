"""The embedded default's Dagster storage (the default of the project's instance class,
`instance.PipelineInstance`, when dagster.yaml names no storage): Dagster's SQLite storages, in
Dagster's files under the home, with one SQLAlchemy engine per database file and process (for
every instance the process opens) instead of a new engine for every query.

Dagster's SQLite storages build an engine on every connection (`create_engine(..., NullPool)` in
`SqliteRunStorage.connect`, `SqliteEventLogStorage._connect`, `SqliteScheduleStorage.connect`).
SQLAlchemy caches compiled statements per engine, so each query is compiled again and each engine
is built again: measured, 4.8 ms of CPU to store one event against 3.1 ms with one engine per
file; a small run stores about 65, and the daemon's sensors and run queue query the run storage
every second. Dagster has no option for it, hence these subclasses.

The engines pool their connections (SQLAlchemy's `QueuePool`, its default for a SQLite file):
a new SQLite connection reads the database's schema again on its first statement, and Dagster's
run database has many tables and indexes. Measured: a run-queue read and a run-record read took
1.9 ms of CPU on a new connection each, 0.6 ms on pooled ones. A run's own event database is the
exception (`_event_log_engine_args`: the webserver follows it by watching its file). A connection is used by one thread
at a time (the pool's checkout; `check_same_thread` off, as SQLAlchemy sets it for files); a
forked child drops the pools it inherited without closing their connections
(`_forget_pooled_connections`, SQLAlchemy's recipe for `os.fork`), and a wipe of the event log
closes them before Dagster deletes the files under them.

Opening a database that Dagster made and stamped skips Dagster's alembic check, which loads every
migration script to learn the head revision (20 ms of CPU, four times in every run and step
process) and then does nothing with a stamped database: Dagster's SQLite storages create and stamp
a database without a revision, and never migrate one on opening (`dagster instance migrate` does).

Dagster's checks of its own schema (has this table, this column, this data migration) reflect the
database on every query that depends on them: the daemon's run queue asks for the runs table's
columns every second, the sensors for the schedule storage's tables on every tick. A schema only
gains what a migration adds, so an answer of yes is kept for the process's life
(`_kept_once_true`); no is asked again.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import yaml
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from dagster._core.storage.event_log import SqlEventLogStorageMetadata
from dagster._core.storage.event_log.sqlite import sqlite_event_log
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    INDEX_SHARD_NAME,
    SQLITE_BUSY_TIMEOUT_SECONDS,
)
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    SqliteEventLogStorage as DagsterSqliteEventLogStorage,
)
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage as DagsterSqliteRunStorage
from dagster._core.storage.schedules.sqlite.sqlite_schedule_storage import (
    SqliteScheduleStorage as DagsterSqliteScheduleStorage,
)
from dagster._core.storage.sql import create_engine, get_alembic_config
from dagster._core.storage.sqlite import create_db_conn_string
from dagster._core.storage.sqlite_storage import (
    DagsterSqliteStorage,
    _event_logs_directory,
    _runs_directory,
    _schedule_directory,
)
from dagster._serdes import ConfigurableClassData
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool, QueuePool

# A process keeps the engines of the databases it used last: the runs' and the schedules'
# databases, the event log's index and the latest runs' own databases (a process that reads many
# runs, the webserver, drops the oldest).
ENGINES = 64
# The event log uses one connection at a time (Dagster's lock per storage): one kept for its index.
EVENT_LOG_POOL_SIZE = 1

# Every pooled engine of this process (the SQLite ones here, the MySQL ones the instance keeps),
# for a forked child to drop.
_POOLED: weakref.WeakSet[Engine] = weakref.WeakSet()


def dropped_in_forked_children(engine: Engine) -> Engine:
    """`engine`, whose pool a process forked from this one replaces with its own (SQLAlchemy's
    recipe for `os.fork`: the parent's connections are left to the parent, neither used nor closed)."""
    _POOLED.add(engine)
    return engine


def _engine(conn_string: str, pooled: bool, **engine_args: Any) -> Engine:
    if not pooled:
        return create_engine(conn_string, poolclass=NullPool, **engine_args)
    # Last in, first out: sequential queries use one connection; the others are there for threads.
    return dropped_in_forked_children(
        create_engine(conn_string, poolclass=QueuePool, pool_use_lifo=True, **engine_args))


def _forget_pooled_connections() -> None:
    """In a forked child: new pools for every engine, the parent's connections left to the parent."""
    for engine in list(_POOLED):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_pooled_connections)


class Engines:
    """Engines by key (a database), shared by everything of the process that opens that database,
    the least recently used closed past `size`. Shared because Dagster opens a new instance where it
    could keep one: the code server for every sensor tick, whose storages then find their engines,
    their pooled connections and their compiled statements already there."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._engines: OrderedDict[Any, Engine] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], Engine]) -> Engine:
        """The engine of `key`, made by `make` the first time."""
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                engine = self._engines[key] = make()
                while len(self._engines) > self._size:
                    self._engines.popitem(last=False)[1].dispose()
            else:
                self._engines.move_to_end(key)
            return engine

    def holds(self, engine: Engine) -> bool:
        with self._lock:
            return any(kept is engine for kept in self._engines.values())

    def dispose_under(self, directory: str) -> None:
        """Close the connections of the engines of the SQLite databases in `directory` (keyed by
        connection string), and forget them."""
        prefix = create_db_conn_string(directory, "")[: -len(".db")]
        with self._lock:
            for key in [key for key in self._engines if isinstance(key, str) and key.startswith(prefix)]:
                self._engines.pop(key).dispose()


def _sqlite_engine(conn_string: str, pooled: bool = True, **engine_args: Any) -> Engine:
    """The process's engine of a SQLite database file (each file is opened by one kind of storage,
    with its `engine_args`)."""
    return _ENGINES.get(conn_string, lambda: _engine(conn_string, pooled, **engine_args))


_ENGINES = Engines(ENGINES)


def _stamped(engine: Engine, table: str | None = None) -> bool:
    """Whether the database has an alembic revision (and `table`): a database Dagster made."""
    with engine.connect() as conn:
        return bool(MigrationContext.configure(conn).get_current_revision()) and (
            table is None or engine.dialect.has_table(conn, table))


def _opened(cls: type, base_dir: str, name: str, table: str, inst_data: ConfigurableClassData | None) -> Any:
    """The storage `cls` on the database `name` under `base_dir`, when Dagster made it already;
    None when Dagster's `from_local` has a database to create."""
    if not os.path.exists(os.path.join(base_dir, f"{name}.db")):
        return None
    conn_string = create_db_conn_string(base_dir, name)
    return cls(conn_string, inst_data) if _stamped(_sqlite_engine(conn_string), table) else None


# The schema checks that answered yes in this process: (database, check, argument).
_SCHEMA_SEEN: set[tuple] = set()


def _kept_once_true(check: Callable[..., bool], keyed: bool = True) -> Callable[..., bool]:
    """Dagster's schema check `check`, its yes kept per database and process (and per argument
    when `keyed`; otherwise its argument is the connection to ask on)."""
    name = check.__name__

    @functools.wraps(check)
    def kept(self: Any, *args: Any) -> bool:
        key = (self.schema_database(), name, *args) if keyed else (self.schema_database(), name)
        if key in _SCHEMA_SEEN:
            return True
        answer = check(self, *args)
        if answer:
            _SCHEMA_SEEN.add(key)
        return answer

    return kept


@functools.cache
def _event_log_scripts() -> ScriptDirectory:
    """Dagster's migration scripts for its SQLite event log, loaded once per process."""
    scripts = ScriptDirectory.from_config(get_alembic_config(sqlite_event_log.__file__))
    scripts.get_current_head()  # loads every script now, under the cache's first call
    return scripts


def _made_stamped(engine: Engine) -> bool:
    """Make a run's new, empty event database as Dagster's `_initdb` does (its tables, WAL, stamped
    at head), with Dagster's migration scripts loaded once per process: Dagster's loads them twice
    for every database it makes (to learn the head, then to stamp it), about 45 ms of CPU for
    each run in the process that records the run's first event (the daemon, for a sensor's run).
    False when the database is not empty or making it failed (another process making it at the
    same time): Dagster's `_initdb`, which waits for the other process, decides then."""
    try:
        with engine.connect() as conn:
            if engine.dialect.get_table_names(conn):
                return False
        SqlEventLogStorageMetadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(text("PRAGMA journal_mode=WAL"))
            MigrationContext.configure(conn).stamp(_event_log_scripts(), "head")
    except sa_exc.DBAPIError:
        return False
    return True


@contextmanager
def _transaction(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn, conn.begin():
        yield conn


class _OneEngine:
    """What Dagster's SQLite run and schedule storages get here: the process's engine of their
    database `_NAME`.db, opened without the alembic check once it holds `_TABLE`."""

    _NAME: str
    _TABLE: str

    def __init__(self, conn_string: str, inst_data: ConfigurableClassData | None = None) -> None:
        self._database = conn_string
        super().__init__(conn_string, inst_data)  # type: ignore[call-arg]

    def schema_database(self) -> str:
        return self._database

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Any) -> Any:
        return cls.from_local(inst_data=inst_data, **config_value)

    @classmethod
    def from_local(cls, base_dir: str, inst_data: ConfigurableClassData | None = None) -> Any:
        return _opened(cls, base_dir, cls._NAME, cls._TABLE, inst_data) or super().from_local(  # type: ignore[misc]
            base_dir, inst_data)

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        with _transaction(_sqlite_engine(self._database)) as conn:
            yield conn


class SqliteRunStorage(_OneEngine, DagsterSqliteRunStorage):
    """Dagster's SQLite run storage with one engine."""

    _NAME, _TABLE = "runs", "instance_info"
    has_run_stats_index_cols = _kept_once_true(DagsterSqliteRunStorage.has_run_stats_index_cols)
    has_bulk_actions_selector_cols = _kept_once_true(DagsterSqliteRunStorage.has_bulk_actions_selector_cols)
    has_backfill_id_column = _kept_once_true(DagsterSqliteRunStorage.has_backfill_id_column)
    has_bulk_action_job_name_column = _kept_once_true(DagsterSqliteRunStorage.has_bulk_action_job_name_column)
    has_backfill_tags_table = _kept_once_true(DagsterSqliteRunStorage.has_backfill_tags_table)
    has_built_index = _kept_once_true(DagsterSqliteRunStorage.has_built_index)


class SqliteScheduleStorage(_OneEngine, DagsterSqliteScheduleStorage):
    """Dagster's SQLite schedule storage with one engine."""

    _NAME, _TABLE = "schedules", "job_ticks"
    _has_instigators_table = _kept_once_true(DagsterSqliteScheduleStorage._has_instigators_table, keyed=False)
    _has_asset_daemon_asset_evaluations_table = _kept_once_true(
        DagsterSqliteScheduleStorage._has_asset_daemon_asset_evaluations_table, keyed=False)
    has_secondary_index_table = _kept_once_true(DagsterSqliteScheduleStorage.has_secondary_index_table)
    has_built_index = _kept_once_true(DagsterSqliteScheduleStorage.has_built_index)


def _event_log_engine_args(shard: str) -> dict[str, Any]:
    """A run's own database is not pooled: Dagster's webserver follows a run's events by watching
    the run's database file (`SqliteEventLogStorageWatchdog`), which changes when the last
    connection to it closes (SQLite then moves the write-ahead log into the file); a connection
    kept open anywhere would keep a live run's page from showing new events. The index is read by
    polling and is pooled."""
    args: dict[str, Any] = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_SECONDS}}
    if shard == INDEX_SHARD_NAME:
        return {**args, "pool_size": EVENT_LOG_POOL_SIZE}
    return {**args, "pooled": False}


class SqliteEventLogStorage(DagsterSqliteEventLogStorage):
    """Dagster's SQLite event log storage (a database per run and an index) with the process's
    engine of each database."""

    def schema_database(self) -> str:
        return self._base_dir

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Any) -> SqliteEventLogStorage:
        return cls(inst_data=inst_data, **config_value)

    has_table = _kept_once_true(DagsterSqliteEventLogStorage.has_table)
    has_asset_key_col = _kept_once_true(DagsterSqliteEventLogStorage.has_asset_key_col)
    has_secondary_index = _kept_once_true(DagsterSqliteEventLogStorage.has_secondary_index)

    def _initdb(self, engine: Engine, for_index_shard: bool = False) -> None:
        if not _stamped(engine, "event_logs") and not _made_stamped(engine):
            super()._initdb(engine, for_index_shard)

    @contextmanager
    def _connect(self, shard: str) -> Iterator[Connection]:
        # As Dagster's: one connection at a time per storage, the run's database made on first use.
        with self._db_lock:
            engine = _sqlite_engine(self.conn_string_for_shard(shard), **_event_log_engine_args(shard))
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
            with _transaction(engine) as conn:
                yield conn

    def wipe(self) -> None:
        # Dagster deletes the runs' database files: no pooled connection may outlive them.
        with self._db_lock:
            _ENGINES.dispose_under(self._base_dir)
        super().wipe()


class SqliteStorage(DagsterSqliteStorage):
    """Dagster's SQLite storage (`storage: sqlite:`), the same files under `base_dir`, with the
    storages above."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        self.base_dir = base_dir
        self._run_storage = SqliteRunStorage.from_local(_runs_directory(base_dir))
        self._event_log_storage = SqliteEventLogStorage(_event_logs_directory(base_dir))
        self._schedule_storage = SqliteScheduleStorage.from_local(_schedule_directory(base_dir))
        self._inst_data = inst_data
        super(DagsterSqliteStorage, self).__init__()

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Any) -> SqliteStorage:
        return cls.from_local(inst_data=inst_data, **config_value)


def sqlite_storage_defaults(base_dir: str) -> dict[str, ConfigurableClassData]:
    """The instance's storage settings for the home `base_dir` (what `InstanceRef.config_defaults`
    gives, with the classes above)."""

    def data(cls: type, directory: str) -> ConfigurableClassData:
        return ConfigurableClassData(__name__, cls.__name__, yaml.dump({"base_dir": directory}))

    return {"storage": data(SqliteStorage, base_dir), "run_storage": data(SqliteRunStorage, _runs_directory(base_dir)),
            "event_log_storage": data(SqliteEventLogStorage, _event_logs_directory(base_dir)),
            "schedule_storage": data(SqliteScheduleStorage, _schedule_directory(base_dir))}
