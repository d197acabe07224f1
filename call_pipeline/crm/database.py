"""Engines for the CRM database (MySQL/MariaDB in production, SQLite for the demo) and the
command that creates the CRM tables in an empty database."""

from __future__ import annotations

import functools
import logging
import ssl
import threading
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url

from call_pipeline.crm.schema import CRM_TABLES, PIPELINE_TABLES, metadata

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = PROJECT_ROOT / "data"

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()
# The databases whose pipeline tables this process has checked (once per process and database).
_pipeline_tables_ensured: set[str] = set()
_pipeline_tables_lock = threading.Lock()
log = logging.getLogger(__name__)


class CrmTablesExistError(RuntimeError):
    """The target database already has CRM tables and was not told to replace them."""


def _enable_sqlite_concurrency(engine: Engine) -> None:
    # The demo runs ops in threads and runs in separate processes against one SQLite file:
    # WAL lets readers proceed during a write, and busy_timeout waits for a lock instead of failing.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # pragma: no cover - trivial
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


@functools.cache
def preferred_ssl_context() -> ssl.SSLContext:
    """What PyMySQL builds for its PREFERRED mode (no SSL option given: TLS if the server offers
    it, no certificate check), made once per process (or once in the forkserver, for the step
    processes it forks)."""
    context = ssl.create_default_context()
    context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _pymysql_connection_class() -> type:
    import pymysql.connections

    class SharedSslContextConnection(pymysql.connections.Connection):
        """PyMySQL (1.2) builds a new default SSL context for every connection in its PREFERRED
        mode, loading the system's CA store each time: about 50 ms of CPU per connection, a
        fifth of a 2,000-lead run's CPU, as each step process opens its own pool. This one
        shares one context per process; explicit SSL options keep PyMySQL's own handling."""

        def _create_ssl_ctx(self, sslp):  # noqa: ANN001, ANN202 - PyMySQL's signature
            if isinstance(sslp, dict) and not sslp:
                return preferred_ssl_context()
            return super()._create_ssl_ctx(sslp)

    return SharedSslContextConnection


def _share_pymysql_ssl_context(engine: Engine) -> None:
    connection_class = _pymysql_connection_class()

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect, _record, cargs, cparams):  # noqa: ANN001, ANN202 - SQLAlchemy's hook
        return connection_class(*cargs, **cparams)


def create_crm_engine(url: str) -> Engine:
    """A new engine for the CRM. MySQL connections are checked before use (`pool_pre_ping`) so
    a connection killed by the server or a network blip is replaced instead of failing a step."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        _enable_sqlite_concurrency(engine)
        return engine
    if parsed.get_backend_name() in ("mysql", "mariadb") and "charset" not in parsed.query:
        parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    engine = create_engine(
        parsed,
        pool_pre_ping=True,
        pool_recycle=1800,
        pool_size=8,
        max_overflow=16,
        connect_args={"connect_timeout": 10, "read_timeout": 60, "write_timeout": 60},
    )
    if engine.dialect.driver == "pymysql":
        _share_pymysql_ssl_context(engine)
    return engine


def get_crm_engine(url: str) -> Engine:
    """The process-wide engine for `url`: ops of one run share its connection pool."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = create_crm_engine(url)
    if str(engine.url) not in _pipeline_tables_ensured:
        try:
            ensure_pipeline_tables(engine)
        except Exception as exc:  # the database unreachable: the step that needs it fails clearly
            log.warning("the pipeline's own tables could not be checked: %s: %s", type(exc).__name__, exc)
    return engine


def ensure_pipeline_tables(engine: Engine, *, force: bool = False) -> None:
    """Creates the pipeline's own tables (crm/schema.py, PIPELINE_TABLES) where they are missing,
    never touching the CRM's tables: an existing CRM gets them on the pipeline's first use. Checked
    once per process and database, unless `force` (after the tables were dropped)."""
    key = str(engine.url)
    if key in _pipeline_tables_ensured and not force:
        return
    with _pipeline_tables_lock:
        if key in _pipeline_tables_ensured and not force:
            return
        try:
            metadata.create_all(engine, tables=list(PIPELINE_TABLES), checkfirst=True)
        except Exception:
            # Another process created them between the check and the CREATE.
            missing = {t.name for t in PIPELINE_TABLES} - set(inspect(engine).get_table_names())
            if missing:
                raise
        _pipeline_tables_ensured.add(key)


def dispose_crm_engines() -> None:
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def existing_crm_tables(engine: Engine) -> list[str]:
    names = set(inspect(engine).get_table_names())
    return [table.name for table in CRM_TABLES if table.name in names]


def create_crm_tables(engine: Engine, *, replace: bool = False) -> None:
    """Create the CRM tables. Refuses to touch a database that already has any of them, unless
    `replace` is set, which drops and recreates them (demo and test databases only)."""
    existing = existing_crm_tables(engine)
    if existing and not replace:
        ensure_pipeline_tables(engine, force=True)
        raise CrmTablesExistError(
            f"the database already has CRM tables {existing}; refusing to touch them "
            "(pass --replace to drop and recreate them, for a demo or test database only)"
        )
    if existing:
        metadata.drop_all(engine, tables=list(CRM_TABLES) + list(PIPELINE_TABLES))
    metadata.create_all(engine, tables=list(CRM_TABLES))
    ensure_pipeline_tables(engine, force=True)
