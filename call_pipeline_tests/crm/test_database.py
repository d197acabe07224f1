"""CRM engines against the real MariaDB."""

import pymysql
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from call_pipeline.crm.database import create_crm_engine


def _raw_connection(url: str) -> pymysql.connections.Connection:
    parsed = make_url(url)
    return pymysql.connect(host=parsed.host, port=parsed.port or 3306, user=parsed.username,
                           password=parsed.password or "", database=parsed.database)


def test_connections_of_a_process_share_one_ssl_context(mariadb_url):
    engine = create_crm_engine(mariadb_url)
    try:
        with engine.connect() as first, engine.connect() as second:
            assert first.execute(sa.text("SELECT 1")).scalar() == 1
            assert second.execute(sa.text("SELECT 2")).scalar() == 2
            contexts = [conn.connection.dbapi_connection.ctx for conn in (first, second)]
        assert contexts[0] is not None and contexts[0] is contexts[1]
        other = create_crm_engine(mariadb_url)
        with other.connect() as third:
            assert third.connection.dbapi_connection.ctx is contexts[0]
        other.dispose()
    finally:
        engine.dispose()


def test_the_shared_context_is_the_one_pymysql_would_build(mariadb_url):
    # Control: PyMySQL on its own builds a new context for each connection (what the engine
    # avoids), with these settings (which the shared context must keep).
    first, second = _raw_connection(mariadb_url), _raw_connection(mariadb_url)
    engine = create_crm_engine(mariadb_url)
    try:
        assert first.ctx is not second.ctx
        with engine.connect() as conn:
            shared = conn.connection.dbapi_connection.ctx
        for attribute in ("verify_mode", "check_hostname", "verify_flags", "options", "minimum_version"):
            assert getattr(shared, attribute) == getattr(first.ctx, attribute), attribute
    finally:
        first.close()
        second.close()
        engine.dispose()
