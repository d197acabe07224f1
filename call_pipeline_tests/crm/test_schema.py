from datetime import datetime

import pytest
import sqlalchemy as sa

from call_pipeline.crm.database import CrmTablesExistError, create_crm_engine, create_crm_tables
from call_pipeline.crm.schema import call_tasks, dcc_leads_follow, leads_task_list

CONTRACT_COLUMNS = {
    "call_tasks": ["id", "task_name", "organization_id", "task_type", "job_group_id", "created_time",
                   "updated_time"],
    "leads_task_list": ["id", "task_id", "leads_id", "organization_id", "leads_phone", "reference_id",
                        "call_job_id", "call_status", "call_conversation", "planed_time", "updated_time",
                        "call_task_id", "calling_number", "recording_url", "leads_follow_id", "is_interested"],
    "dcc_leads_follow": ["id", "leads_id", "follow_time", "leads_remark", "frist_follow_time",
                         "new_follow_time", "next_follow_time"],
}


def test_tables_have_exactly_the_spec_columns(crm_url):
    engine = create_crm_engine(crm_url)
    inspector = sa.inspect(engine)
    for table, columns in CONTRACT_COLUMNS.items():
        assert [c["name"] for c in inspector.get_columns(table)] == columns
    index_names = {ix["name"] for ix in inspector.get_indexes("leads_task_list")}
    assert {"idx_task", "idx_job", "idx_call_task"} <= index_names
    engine.dispose()


def test_mysql_types_and_charset(mariadb_url):
    engine = create_crm_engine(mariadb_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT TABLE_NAME, COLUMN_NAME, COLUMN_TYPE FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = DATABASE()")).all()
        types = {(t, c): ty.lower() for t, c, ty in rows}
        collations = dict(conn.execute(sa.text(
            "SELECT TABLE_NAME, TABLE_COLLATION FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()")).all())
    assert types[("call_tasks", "id")].startswith("bigint")
    assert types[("call_tasks", "task_type")].startswith("tinyint")
    assert types[("leads_task_list", "call_conversation")] == "longtext"
    assert types[("leads_task_list", "recording_url")] == "varchar(2048)"
    assert types[("leads_task_list", "is_interested")].startswith("tinyint")
    assert types[("dcc_leads_follow", "frist_follow_time")] == "datetime"
    assert all(collation.startswith("utf8mb4") for collation in collations.values())
    engine.dispose()


def test_round_trip_chinese_text_and_autoincrement(crm_url):
    engine = create_crm_engine(crm_url)
    conversation = '[{"Speaker": "Contact", "Script": "我想试驾一下 🚗"}]'
    with engine.begin() as conn:
        task_id = conn.execute(call_tasks.insert().values(task_name="春季试驾邀约", task_type=2,
                                                          job_group_id="jg-1")).inserted_primary_key[0]
        conn.execute(leads_task_list.insert().values(task_id=task_id, leads_id=7, call_conversation=conversation))
        follow_id = conn.execute(dcc_leads_follow.insert().values(
            leads_id=7, follow_time=datetime(2026, 11, 28, 9, 0), leads_remark="客户有意向")).inserted_primary_key[0]
    with engine.connect() as conn:
        assert conn.execute(sa.select(call_tasks.c.task_name, call_tasks.c.task_type)).one() == ("春季试驾邀约", 2)
        assert conn.execute(sa.select(leads_task_list.c.call_conversation)).scalar_one() == conversation
    assert task_id >= 1 and follow_id >= 1
    engine.dispose()


def test_create_refuses_a_database_that_has_the_tables(crm_url):
    engine = create_crm_engine(crm_url)
    with engine.begin() as conn:
        conn.execute(call_tasks.insert().values(task_name="keep me"))
    with pytest.raises(CrmTablesExistError, match="refusing"):
        create_crm_tables(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(call_tasks)).scalar_one() == 1
    create_crm_tables(engine, replace=True)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(call_tasks)).scalar_one() == 0
    engine.dispose()


def test_an_existing_crm_gets_the_pipelines_own_table_and_keeps_its_own(crm_url):
    """A CRM made before the pipeline had a table of its own (contract §12): `init-db` and the
    pipeline's first use create `call_pipeline_unit_failures` and touch no CRM table."""
    from call_pipeline.crm.database import get_crm_engine
    from call_pipeline.crm.schema import call_pipeline_unit_failures

    engine = create_crm_engine(crm_url)
    call_pipeline_unit_failures.drop(engine)
    with engine.begin() as conn:
        conn.execute(call_tasks.insert().values(task_name="keep me"))
    assert "call_pipeline_unit_failures" not in sa.inspect(engine).get_table_names()
    with pytest.raises(CrmTablesExistError):
        create_crm_tables(engine)  # init-db on an existing CRM
    assert "call_pipeline_unit_failures" in sa.inspect(engine).get_table_names()
    with engine.connect() as conn:
        assert conn.execute(sa.select(call_tasks.c.task_name)).scalars().all() == ["keep me"]

    call_pipeline_unit_failures.drop(engine)
    from call_pipeline.crm import database

    database._pipeline_tables_ensured.clear()  # a new process
    get_crm_engine(crm_url)  # the pipeline's first use in a process
    assert "call_pipeline_unit_failures" in sa.inspect(engine).get_table_names()
    with engine.connect() as conn:
        assert conn.execute(sa.select(call_tasks.c.task_name)).scalars().all() == ["keep me"]
    engine.dispose()
