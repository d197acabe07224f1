"""Shared fixtures: a real MariaDB database per test session (created and dropped here), SQLite
for the embedded default, and the simulator on a free port, reached through the real SDKs."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from call_pipeline.clients.proxies import drop_proxy_variables
from call_pipeline.crm.database import create_crm_engine, create_crm_tables
from call_pipeline.settings import settings
from call_pipeline_tests import xdist_shared

MARIADB_SERVER_URL = os.environ.get("CALL_PIPELINE_TEST_MYSQL_URL", "mysql+pymysql://root:@127.0.0.1:3306")

# Op retries back off for seconds in production; in tests a retry happens at once. Set before
# the ops are defined (their retry policy reads the settings then).
os.environ.setdefault("CALL_PIPELINE_OP_RETRY_DELAY_SECONDS", "0")
os.environ.setdefault("CALL_PIPELINE_OP_MAX_RETRIES", "1")
# The SDKs' own retries wait 0.5 s to 8 s (OutboundBot) and 1 s to 20 s (DashScope) in production;
# against the simulator they retry within milliseconds, with the same number of attempts. Run
# processes and workers the tests start inherit these; tests of the backoff itself set their own.
os.environ.setdefault("OUTBOUNDBOT_BACKOFF_MS", "20")
os.environ.setdefault("OUTBOUNDBOT_MAX_BACKOFF_MS", "200")
os.environ.setdefault("DASHSCOPE_BACKOFF_S", "0.02")
os.environ.setdefault("DASHSCOPE_MAX_BACKOFF_S", "0.2")

# Where the tests' runs hand the pipeline's per-test variables to step processes forked from a
# forkserver started in an earlier test (reliability/harness.py, `prepare_step_processes`): set
# before any forkserver starts, so that every one inherits it; one file per test session.
_step_env_dir = tempfile.mkdtemp(prefix="call_pipeline_step_env_")
atexit.register(shutil.rmtree, _step_env_dir, ignore_errors=True)
os.environ["CALL_PIPELINE_TEST_STEP_ENV_FILE"] = os.path.join(_step_env_dir, "step_env.json")

# The Alibaba SDK sends even loopback traffic through HTTP(S)_PROXY; the tests talk to loopback only.
drop_proxy_variables()


@pytest.fixture(scope="session", autouse=True)
def _limits_state_dir(tmp_path_factory) -> Iterator[None]:
    """Each test session keeps its rate-limiter files apart from any other run on the machine."""
    previous = os.environ.get("CALL_PIPELINE_STATE_DIR")
    os.environ["CALL_PIPELINE_STATE_DIR"] = str(tmp_path_factory.mktemp("limits"))
    settings.cache_clear()  # collecting the tests may have read the settings already
    yield
    if previous is None:
        os.environ.pop("CALL_PIPELINE_STATE_DIR", None)
    else:
        os.environ["CALL_PIPELINE_STATE_DIR"] = previous
    settings.cache_clear()


# Several production-shaped deployments run at once under xdist (reliability/test_run_launcher.py:
# a daemon, a code server and run workers each, every one keeping its MySQL connections), beside
# the other workers' tests: 171 connections at the suite's peak, measured (README, "Tests").
# MariaDB's default of 151 refuses some, and a refused connection fails those tests' runs in ways
# of its own. 300 is what the README advises a deployment that starts bursts.
MARIADB_CONNECTIONS_NEEDED = 300


@pytest.fixture(scope="session")
def mariadb_server_url() -> Iterator[str]:
    """The machine's MariaDB, reachable and taking MARIADB_CONNECTIONS_NEEDED connections (raised
    to that when lower; `SET GLOBAL` lasts until the server restarts). An unreachable MariaDB is an
    error, never a skip: CI must not pass without the MySQL tests."""
    server = sa.create_engine(MARIADB_SERVER_URL, isolation_level="AUTOCOMMIT")
    try:
        with server.connect() as conn:
            allowed = conn.execute(sa.text("SELECT @@GLOBAL.max_connections")).scalar_one()
            if allowed < MARIADB_CONNECTIONS_NEEDED:
                try:
                    conn.execute(sa.text(f"SET GLOBAL max_connections = {MARIADB_CONNECTIONS_NEEDED}"))
                except sa.exc.DBAPIError as exc:
                    pytest.fail(f"MariaDB at {MARIADB_SERVER_URL} takes {allowed} connections, the suite needs "
                                f"{MARIADB_CONNECTIONS_NEEDED}, and raising max_connections failed: {exc}")
    except sa.exc.OperationalError as exc:
        pytest.fail(f"MariaDB at {MARIADB_SERVER_URL} is unreachable; the MySQL tests cannot run: {exc}")
    finally:
        server.dispose()
    yield MARIADB_SERVER_URL


@contextlib.contextmanager
def mariadb_database(server_url: str, prefix: str) -> Iterator[str]:
    """A new utf8mb4 database named `prefix` and a random suffix on the server; its name, then dropped."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    server = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"))
    try:
        yield name
    finally:
        with server.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
        server.dispose()


@pytest.fixture(scope="session")
def mariadb_database_url(mariadb_server_url: str) -> Iterator[str]:
    """A fresh database on the machine's MariaDB for this test session, dropped after."""
    with mariadb_database(mariadb_server_url, "call_pipeline_test") as name:
        yield f"{mariadb_server_url}/{name}?charset=utf8mb4"


@pytest.fixture
def mariadb_url(mariadb_database_url: str) -> Iterator[str]:
    """The session database with empty CRM tables for this test."""
    engine = create_crm_engine(mariadb_database_url)
    create_crm_tables(engine, replace=True)
    engine.dispose()
    yield mariadb_database_url


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'crm.sqlite3'}"
    engine = create_crm_engine(url)
    create_crm_tables(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["mariadb", "sqlite"])
def crm_url(request) -> str:
    """Both CRM backends: MariaDB over TCP and the embedded SQLite default."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def simulator():
    """A fresh simulator per test, on a free port."""
    from call_pipeline_tools.simulator.server import start_simulator

    handle = start_simulator()
    try:
        yield handle
    finally:
        handle.stop()


MARIADB_FIXTURES = {"mariadb_url", "mariadb_server_url", "mariadb_database_url", "crm_url", "clean_database_url",
                    "dagster_mysql_env"}


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background by a script (`... &`: SIGINT ignored, as POSIX shells do)
    # would hand the ignored SIGINT to every process it starts, and `serve` keeps an ignored
    # SIGINT ignored; the tests that press Ctrl-C on it need SIGINT as a terminal gives it.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # The controlling process of an xdist session makes the folder its workers share (xdist_shared.py).
    if not hasattr(config, "workerinput") and config.getoption("numprocesses", default=None):
        config.stash[_SHARED_DIR] = xdist_shared.make_shared_dir()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SHARED_DIR in config.stash:
        xdist_shared.remove_shared_dir(config.stash[_SHARED_DIR])


# The hooks that hold the suite's lock around each test (xdist_shared.py), registered here.
pytest_runtest_protocol = xdist_shared.pytest_runtest_protocol
pytest_runtest_setup = xdist_shared.pytest_runtest_setup
pytest_runtest_call = xdist_shared.pytest_runtest_call
pytest_runtest_teardown = xdist_shared.pytest_runtest_teardown


_SHARED_DIR = pytest.StashKey[str]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that reach MariaDB carry the `mariadb` marker (`-m "not mariadb"`: the rest, in
    seconds, with no server); CI runs everything. Under xdist the tests are handed out in
    `xdist_shared.hand_out_order`."""
    for item in items:
        if MARIADB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.mariadb)
    if hasattr(config, "workerinput"):
        xdist_shared.hand_out_order(items)


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server (moto's server mode) for this test session."""
    from call_pipeline_tests.s3_server import s3_server

    with s3_server() as server:
        yield server


@pytest.fixture
def aws_test_credentials(monkeypatch):
    """boto3's credentials for the test S3 server."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
