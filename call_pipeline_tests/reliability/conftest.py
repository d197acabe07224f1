"""Fixtures of the reliability suite: a persistent Dagster instance per test (runs can be
re-executed from failure), a second MariaDB database for clean runs, and the clean run of each
scenario, computed once per session."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import dagster as dg
import pytest

from call_pipeline.crm.database import create_crm_engine, create_crm_tables, get_crm_engine
from call_pipeline_tests.conftest import mariadb_database
from call_pipeline_tests.pipeline_harness import project_instance_for_test
from call_pipeline_tests.reliability.harness import FAULT_RUNS_EXECUTOR, pipeline_env, settle
from call_pipeline_tests.reliability.invariant import normalized
from call_pipeline_tests.reliability.scenarios import Scenario
from call_pipeline_tests.xdist_shared import computed_once, shared_dir
from call_pipeline_tools.simulator.server import start_simulator


@pytest.fixture
def instance(tmp_path) -> Iterator[dg.DagsterInstance]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    with project_instance_for_test(temp_dir=str(home)) as instance:
        yield instance


@pytest.fixture(scope="session")
def clean_database_url(mariadb_server_url: str) -> Iterator[str]:
    """A second database, where each scenario's clean run happens."""
    with mariadb_database(mariadb_server_url, "call_pipeline_clean") as name:
        url = f"{mariadb_server_url}/{name}?charset=utf8mb4"
        try:
            yield url
        finally:
            get_crm_engine(url).dispose()


@pytest.fixture(scope="session")
def clean_run(clean_database_url, tmp_path_factory) -> Callable[[Scenario], dict]:
    """`clean_run(scenario)`: the normalized CRM after a clean run of the scenario (every job
    loaded from the start, no faults), cached per scenario name and task id: in this process, and
    under xdist for every worker of the session (the first that asks computes it)."""
    cache: dict[tuple, dict] = {}

    def compute(scenario: Scenario, page_size: int) -> dict:
        engine = create_crm_engine(clean_database_url)
        create_crm_tables(engine, replace=True)
        engine.dispose()
        home = tmp_path_factory.mktemp("clean_home")
        with start_simulator() as simulator, pipeline_env(clean_database_url, simulator), \
                project_instance_for_test(temp_dir=str(home)) as instance:
            scenario.install(clean_database_url, simulator, all_jobs=True)
            settled = settle(instance, clean_database_url, scenario.task_id, page_size=page_size,
                             executor=FAULT_RUNS_EXECUTOR)
            assert all(a.success for a in settled.attempts), f"the clean run of {scenario.name} failed"
            return normalized(clean_database_url, scenario.task_id)

    def run(scenario: Scenario, page_size: int = 20) -> dict:
        key = (scenario.name, scenario.task_id, len(scenario.leads), page_size)
        if key not in cache:
            shared = shared_dir()
            # across workers the scenario's content is part of the key too
            shared_key = ("clean_run", *key, repr((scenario.leads, scenario.group)))
            cache[key] = (computed_once(shared, shared_key, lambda: compute(scenario, page_size))
                          if shared else compute(scenario, page_size))
        return cache[key]

    return run


@pytest.fixture
def env(mariadb_url, simulator):
    """The pipeline's environment pointed at this test's database and simulator; call it again
    with knobs (read_timeout_ms=..., llm_timeout_s=..., max_concurrency=...) to change them."""
    from contextlib import ExitStack

    stack = ExitStack()

    def configure(crm_url: str | None = None, **knobs) -> dict:
        return stack.enter_context(pipeline_env(crm_url or mariadb_url, simulator, **knobs))

    configure()
    yield configure
    stack.close()


@pytest.fixture
def broker_url():
    """A RabbitMQ virtual host of this test's own, deleted after: its queues are nobody else's."""
    import subprocess

    vhost = f"call_pipeline_test_{uuid.uuid4().hex[:10]}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True, capture_output=True, timeout=60)
    subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
                   check=True, capture_output=True, timeout=60)
    try:
        yield f"pyamqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True, timeout=60)


@pytest.fixture
def redis_prefix():
    """A key prefix of this test's own in the machine's Redis; its keys are deleted after."""
    import redis

    prefix = f"call_pipeline_test_{uuid.uuid4().hex[:10]}"
    yield prefix
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    for key in client.scan_iter(f"*{prefix}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def dagster_mysql_env(mariadb_server_url: str) -> Iterator[dict[str, str]]:
    """A utf8mb4 database of its own on the machine's MariaDB for a production-like Dagster
    instance (deploy/dagster.yaml reads these variables), dropped after."""
    with mariadb_database(mariadb_server_url, "call_pipeline_dagster") as name:
        yield {"DAGSTER_MYSQL_HOST": "127.0.0.1", "DAGSTER_MYSQL_PORT": "3306", "DAGSTER_MYSQL_USER": "root",
               "DAGSTER_MYSQL_PASSWORD": "", "DAGSTER_MYSQL_DB": name}
