"""What a `runs` worker's process keeps of the instance's MySQL storage (celery_app)."""

from __future__ import annotations

import threading

import dagster as dg
import sqlalchemy as sa
import yaml

from call_pipeline import celery_app


def test_a_threads_pool_process_keeps_as_many_storage_connections_as_it_is_given(dagster_mysql_env, tmp_path):
    """Eight runs' threads write at once: with `keep_connections(4)` each MySQL storage keeps four
    of the connections they opened (Dagster's `optimize_for_webserver` alone keeps one, and every
    other write opens and closes a connection of its own)."""
    env = dagster_mysql_env
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump({"storage": {"mysql": {"mysql_db": {
        "hostname": env["DAGSTER_MYSQL_HOST"], "port": int(env["DAGSTER_MYSQL_PORT"]),
        "username": env["DAGSTER_MYSQL_USER"], "password": env["DAGSTER_MYSQL_PASSWORD"],
        "db_name": env["DAGSTER_MYSQL_DB"]}}}}), encoding="utf-8")

    def kept_after_eight_at_once(size: int | None) -> list[int]:
        instance = dg.DagsterInstance.from_config(str(tmp_path))
        try:
            instance.optimize_for_webserver(15000, 3600, -1)
            if size is not None:
                celery_app.keep_connections(instance, size)
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
            return [engine.pool.checkedin() for engine in engines]
        finally:
            instance.dispose()

    assert kept_after_eight_at_once(None) == [1, 1, 1]
    assert kept_after_eight_at_once(4) == [4, 4, 4]
