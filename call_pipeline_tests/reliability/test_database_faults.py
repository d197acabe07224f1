"""The CRM database fails under the pipeline: connections killed in the middle of a transaction
(at the step boundaries where a half-written result could remain), connections killed at random
from another connection while a run goes on, and the database unreachable for a few seconds.

Connections are checked before use and replaced (crm/database.py: pool_pre_ping), a failed unit
fails its step after the rest is saved, the run is re-executed from failure, and no half-written
follow-up ever exists: every dcc_leads_follow row is linked from exactly one lead, at every
moment (the Monitor samples from its own connection) and at the end."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from call_pipeline.crm.database import get_crm_engine
from call_pipeline_tests.reliability import scenarios
from call_pipeline_tests.reliability.harness import event_messages, settle
from call_pipeline_tests.reliability.invariant import Monitor, assert_matches_clean_run, normalized
from call_pipeline_tests.reliability.tcp_proxy import TcpProxy


def server_engine(crm_url: str) -> sa.Engine:
    """A connection to the server with no default database: never one the tests kill."""
    return sa.create_engine(make_url(crm_url).set(database=None), isolation_level="AUTOCOMMIT")


def follow_up_count(crm_url: str) -> int:
    with get_crm_engine(crm_url).connect() as conn:
        return int(conn.execute(sa.text("SELECT COUNT(*) FROM dcc_leads_follow")).scalar())


class when(threading.Thread):  # noqa: N801 - reads as a sentence: when(condition, action)
    """Run `action` in a thread as soon as `condition()` holds. `stop()` ends the watch (and
    joins it) if the condition never held: a watcher must not outlive its test."""

    def __init__(self, condition, action, timeout_s: float = 60.0) -> None:
        super().__init__(daemon=True)
        self.condition, self.action, self.timeout_s = condition, action, timeout_s
        self.stopped = threading.Event()
        self.start()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline and not self.stopped.is_set():
            try:
                if self.condition():
                    self.action()
                    return
            except sa.exc.DBAPIError:
                pass
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> None:
        self.stopped.set()
        self.join(timeout)
        assert not self.is_alive(), "the watcher did not end"


@contextlib.contextmanager
def pipeline_user(crm_url: str):
    """A MariaDB user of its own for the pipeline (all rights on the test database): its
    connections can be told from the test's own (the Monitor, the checks), which a fault that
    kills connections must spare. Yields the pipeline's URL and the user name."""
    url = make_url(crm_url)
    user, password = f"cp_pipe_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    admin = server_engine(crm_url)
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"))
        conn.execute(sa.text(f"GRANT ALL PRIVILEGES ON `{url.database}`.* TO '{user}'@'%'"))
    try:
        yield url.set(username=user, password=password).render_as_string(hide_password=False), user
    finally:
        with admin.connect() as conn:
            for thread_id in conn.execute(sa.text(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = :user"), {"user": user}).scalars():
                with contextlib.suppress(sa.exc.DBAPIError):
                    conn.execute(sa.text(f"KILL CONNECTION {int(thread_id)}"))
            conn.execute(sa.text(f"DROP USER '{user}'@'%'"))
        admin.dispose()


# Statements after which the connection is killed, before its transaction commits: step 2's
# bulk match write, step 3's bulk result write, and step 5's follow-up insert (whose link to the
# lead is the next statement of the same transaction).
KILL_AFTER = {
    "UPDATE leads_task_list SET call_job_id": 1,
    "UPDATE leads_task_list SET call_status": 1,
    "INSERT INTO dcc_leads_follow": 3,
}


def test_connection_killed_inside_a_transaction(mariadb_url, simulator, instance, env, clean_run):
    scenario = scenarios.mixed()
    clean = clean_run(scenario)
    scenario.install(mariadb_url, simulator)
    engine = get_crm_engine(mariadb_url)
    admin = server_engine(mariadb_url)
    remaining = dict(KILL_AFTER)
    killed: list[str] = []
    lock = threading.Lock()

    def kill_mid_transaction(conn, cursor, statement, parameters, context, executemany):
        with lock:
            key = next((k for k, n in remaining.items() if n and statement.startswith(k)), None)
            if key is None:
                return
            remaining[key] -= 1
        with admin.connect() as kill_conn:
            kill_conn.execute(sa.text(f"KILL CONNECTION {int(cursor.connection.thread_id())}"))
        killed.append(key)

    sa.event.listen(engine, "after_cursor_execute", kill_mid_transaction)
    try:
        with Monitor(mariadb_url, [scenario.task_id]):
            # the hook lives on this process's engine: the steps run in this process
            settled = settle(instance, mariadb_url, scenario.task_id, executor="in_process")
    finally:
        sa.event.remove(engine, "after_cursor_execute", kill_mid_transaction)
        admin.dispose()

    assert sorted(killed) == sorted(k for k, n in KILL_AFTER.items() for _ in range(n))
    final = normalized(mariadb_url, scenario.task_id)
    assert_matches_clean_run(final, clean)
    # the killed units failed their steps, which said why and were retried (op RetryPolicy)
    assert "Lost connection" in "\n".join(event_messages(instance, settled.run_ids))
    # every insert whose transaction was killed was rolled back: no record without its lead
    assert follow_up_count(mariadb_url) == sum(1 for lead in final["leads"].values() if lead["follow_up"])


@pytest.mark.slow
def test_connections_killed_from_another_connection_during_a_run(mariadb_url, simulator, instance, env,
                                                                 clean_run):
    scenario = scenarios.mixed()
    clean = clean_run(scenario)
    scenario.install(mariadb_url, simulator)
    simulator.state.set_latency(outboundbot_ms=20, dashscope_ms=80)
    admin = server_engine(mariadb_url)
    kills = []

    with pipeline_user(mariadb_url) as (pipeline_url, user):
        env(crm_url=pipeline_url, max_concurrency=2)

        def kill_pipeline_connections() -> None:
            """For 2 s, every 100 ms: KILL every connection of the pipeline's user (step
            processes, whatever they are doing); the test's own connections are spared."""
            end = time.monotonic() + 2.0
            with admin.connect() as conn:
                while time.monotonic() < end:
                    ids = conn.execute(sa.text("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = :user"),
                                       {"user": user}).scalars().all()
                    for thread_id in ids:
                        try:
                            conn.execute(sa.text(f"KILL CONNECTION {int(thread_id)}"))
                            kills.append(thread_id)
                        except sa.exc.DBAPIError:
                            pass  # it ended meanwhile
                    time.sleep(0.1)

        killer = when(lambda: follow_up_count(mariadb_url) >= 2, kill_pipeline_connections)
        try:
            with Monitor(mariadb_url, [scenario.task_id]):
                settled = settle(instance, mariadb_url, scenario.task_id, pause_s=0.5)
        finally:
            killer.stop()
            admin.dispose()

    assert kills, "the killer found no pipeline connection to kill"
    final = normalized(mariadb_url, scenario.task_id)
    assert_matches_clean_run(final, clean)
    assert follow_up_count(mariadb_url) == sum(1 for lead in final["leads"].values() if lead["follow_up"])
    assert settled.attempts[-1].success


@pytest.mark.slow
def test_database_unreachable_for_a_few_seconds(mariadb_url, simulator, instance, env, clean_run):
    scenario = scenarios.mixed()
    clean = clean_run(scenario)
    scenario.install(mariadb_url, simulator)
    simulator.state.set_latency(outboundbot_ms=20, dashscope_ms=80)
    with TcpProxy() as proxy:
        env(crm_url=proxy.url_for(mariadb_url), max_concurrency=2)
        # Down from the middle of step 5 until the run that met it has ended: a fixed few seconds
        # could end before the step's retries come (on a loaded machine), and the run would pass.
        outage = when(lambda: follow_up_count(mariadb_url) >= 2, proxy.down)
        with Monitor(mariadb_url, [scenario.task_id]):
            # the operator reruns a failed run a little later, not in the same millisecond
            settled = settle(instance, mariadb_url, scenario.task_id, pause_s=1.0, max_runs=10,
                             after_each=lambda _attempt: proxy.up())
        outage.stop()
        proxy.up()
        assert proxy.cut >= 1, "the outage cut no connection"

    final = normalized(mariadb_url, scenario.task_id)
    assert_matches_clean_run(final, clean)
    assert follow_up_count(mariadb_url) == sum(1 for lead in final["leads"].values() if lead["follow_up"])
    assert settled.failures >= 1
    messages = "\n".join(event_messages(instance, settled.run_ids))
    # the proxy accepts every connection and, while down, closes it at once: the client reads
    # no handshake, which PyMySQL reports as a lost connection (never "Can't connect")
    assert "Lost connection" in messages
