"""The CRM tables (docs/contract.md, "CRM tables") as SQLAlchemy Core objects.

The pipeline owns none of these tables: it reads and writes only the columns below, never adds
columns and never deletes rows. The same definitions create the tables on MySQL/MariaDB
(utf8mb4) for the tests and on SQLite for the embedded demo.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects import mysql

metadata = MetaData()

# SQLite only auto-increments an `INTEGER PRIMARY KEY`, so BIGINT ids become INTEGER there.
_ID = BigInteger().with_variant(Integer(), "sqlite")
_TINYINT = SmallInteger().with_variant(mysql.TINYINT(), "mysql", "mariadb")
_LONGTEXT = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
# Dagster's storage registers a process-wide compile hook that renders a generic DateTime as
# DATETIME(6) on MySQL; the CRM's columns are plain DATETIME, whichever process creates them.
_DATETIME = DateTime().with_variant(mysql.DATETIME(), "mysql", "mariadb")

_MYSQL_TABLE_ARGS = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_unicode_ci", "mysql_engine": "InnoDB"}

call_tasks = Table(
    "call_tasks",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("task_name", String(255), nullable=False),
    Column("organization_id", BigInteger, nullable=True),
    # 1 created, 2 calling, 3 calls done / follow-up running, 4 follow-up done
    Column("task_type", _TINYINT, nullable=False, server_default="1"),
    Column("job_group_id", String(64), nullable=True),
    Column("created_time", _DATETIME, nullable=True),
    Column("updated_time", _DATETIME, nullable=True),
    **_MYSQL_TABLE_ARGS,
)

leads_task_list = Table(
    "leads_task_list",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("task_id", BigInteger, nullable=False),
    Column("leads_id", BigInteger, nullable=False),
    Column("organization_id", BigInteger, nullable=True),
    Column("leads_phone", String(32), nullable=True),
    # written at task creation: f"{task_id}{organization_id}{leads_id}"
    Column("reference_id", String(128), nullable=True),
    Column("call_job_id", String(64), nullable=True),
    Column("call_status", String(32), nullable=True),
    Column("call_conversation", _LONGTEXT, nullable=True),
    Column("planed_time", _DATETIME, nullable=True),
    Column("updated_time", _DATETIME, nullable=True),
    Column("call_task_id", String(64), nullable=True),
    Column("calling_number", String(32), nullable=True),
    Column("recording_url", String(2048), nullable=True),
    Column("leads_follow_id", BigInteger, nullable=True),
    # 0 cannot tell, 1 interested, 2 not interested
    Column("is_interested", _TINYINT, nullable=True),
    Index("idx_task", "task_id"),
    Index("idx_job", "call_job_id"),
    Index("idx_call_task", "call_task_id"),
    **_MYSQL_TABLE_ARGS,
)

dcc_leads_follow = Table(
    "dcc_leads_follow",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),  # the follow_id
    Column("leads_id", BigInteger, nullable=False),
    Column("follow_time", _DATETIME, nullable=False),
    Column("leads_remark", Text, nullable=True),
    # The misspelling is the real column name in the CRM.
    Column("frist_follow_time", _DATETIME, nullable=True),
    Column("new_follow_time", _DATETIME, nullable=True),
    Column("next_follow_time", _DATETIME, nullable=True),
    **_MYSQL_TABLE_ARGS,
)

CRM_TABLES = (call_tasks, leads_task_list, dcc_leads_follow)

# ---- the pipeline's own tables (not the CRM's): created beside them, and if missing on an existing
# CRM (crm/database.ensure_pipeline_tables), never needed by the CRM itself.

# When the call of a Succeeded lead without a transcript ended: step 3 writes it, steps 3 and 5
# read it to wait CALL_PIPELINE_TRANSCRIPT_GRACE_SECONDS for a transcript that comes late.
call_pipeline_call_ends = Table(
    "call_pipeline_call_ends",
    metadata,
    Column("lead_row_id", BigInteger, nullable=False),  # leads_task_list.id
    Column("task_id", BigInteger, nullable=False),
    Column("call_ended_time", _DATETIME, nullable=False),
    PrimaryKeyConstraint("lead_row_id"),
    **_MYSQL_TABLE_ARGS,
)

# The hot leads posted to CALL_PIPELINE_HOT_LEAD_WEBHOOK_URL, each claimed (its row inserted) before
# its post and marked posted after it: a lead is never posted twice (steps/hot_leads.py).
call_pipeline_hot_leads_posted = Table(
    "call_pipeline_hot_leads_posted",
    metadata,
    Column("lead_row_id", BigInteger, nullable=False),  # leads_task_list.id
    Column("task_id", BigInteger, nullable=False),
    Column("claim_token", String(32), nullable=False),
    Column("claimed_time", _DATETIME, nullable=False),
    Column("posted_time", _DATETIME, nullable=True),  # NULL: claimed by a post under way (or cut short)
    PrimaryKeyConstraint("lead_row_id"),
    **_MYSQL_TABLE_ARGS,
)

# The pipeline's own table (contract §12, "A lead that keeps failing does not hold its task"): per
# lead and unit of work ("call_result", "recording", "follow_up"), the runs in which it failed and
# whether it was given up. Never one of the CRM's columns: it lives beside the CRM's tables, created
# with them, and created when missing in a CRM that has them (`ensure_pipeline_tables`).
call_pipeline_unit_failures = Table(
    "call_pipeline_unit_failures",
    metadata,
    Column("task_id", BigInteger, nullable=False),
    Column("lead_row_id", BigInteger, nullable=False),  # leads_task_list.id
    Column("unit", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),  # runs in which the unit failed
    Column("last_error", String(1000), nullable=True),
    Column("last_run_id", String(64), nullable=True),  # counted at most once per run
    Column("given_up", Boolean, nullable=False, server_default="0"),
    Column("alerted", Boolean, nullable=False, server_default="0"),  # its one alert was posted
    Column("updated_time", _DATETIME, nullable=True),
    PrimaryKeyConstraint("lead_row_id", "unit"),
    Index("idx_unit_failures_task", "task_id", "unit"),
    **_MYSQL_TABLE_ARGS,
)

PIPELINE_TABLES = (call_pipeline_call_ends, call_pipeline_hot_leads_posted, call_pipeline_unit_failures)
