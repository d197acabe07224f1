"""The benchmark's CRM: a fresh database (SQLite or a MariaDB database of its own), the call
tasks seeded into it, and what the runs left there."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from datetime import datetime

import sqlalchemy as sa

MARIADB_SERVER_URL = os.environ.get("CALL_PIPELINE_BENCH_MYSQL_URL", "mysql+pymysql://root:@127.0.0.1:3306")
ORGANIZATION_ID = 77
JOB_GROUP_ID = "jg-bench"


# ---- the CRM ------------------------------------------------------------------------------------


@contextlib.contextmanager
def crm_database(kind: str, workdir: str) -> Iterator[str]:
    """A fresh CRM: a SQLite file in the work folder, or a utf8mb4 MariaDB database of its own
    that is dropped afterwards."""
    from call_pipeline.crm.database import create_crm_engine, create_crm_tables

    if kind == "sqlite":
        url = f"sqlite:///{os.path.join(workdir, 'crm.sqlite3')}"
        engine = create_crm_engine(url)
        create_crm_tables(engine)
        engine.dispose()
        yield url
        return
    name = f"call_pipeline_bench_{uuid.uuid4().hex[:10]}"
    server = sa.create_engine(MARIADB_SERVER_URL, isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"))
    try:
        url = f"{MARIADB_SERVER_URL}/{name}?charset=utf8mb4"
        engine = create_crm_engine(url)
        create_crm_tables(engine)
        engine.dispose()
        yield url
    finally:
        from call_pipeline.crm.database import dispose_crm_engines

        dispose_crm_engines()
        with server.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
        server.dispose()


def seed_task(url: str, leads: int, job_group_id: str = JOB_GROUP_ID, first_lead: int = 0,
              name_suffix: str = "") -> int:
    """One call task at task_type 2 with `leads` leads, each with a reference id and a phone (lead
    numbers from `first_lead` on: the tasks of one benchmark have leads and phones of their own)."""
    from call_pipeline.crm.database import create_crm_engine
    from call_pipeline.crm.schema import call_tasks, leads_task_list

    engine = create_crm_engine(url)
    now = datetime.now().replace(microsecond=0)
    with engine.begin() as conn:
        task_id = int(conn.execute(call_tasks.insert().values(
            task_name=f"基准测试 {leads} 条线索{name_suffix}", organization_id=ORGANIZATION_ID, task_type=2,
            job_group_id=job_group_id, created_time=now, updated_time=now)).inserted_primary_key[0])
        chunk = 2_000
        for start in range(first_lead, first_lead + leads, chunk):
            rows = []
            for n in range(start, min(first_lead + leads, start + chunk)):
                leads_id = 1_000_000 + n
                rows.append({"task_id": task_id, "leads_id": leads_id, "organization_id": ORGANIZATION_ID,
                             "leads_phone": f"13{n % 10}{n:08d}",
                             "reference_id": f"{task_id}{ORGANIZATION_ID}{leads_id}"})
            conn.execute(leads_task_list.insert(), rows)
    engine.dispose()
    return task_id


def task_outcome(url: str, task_id: int) -> dict:
    from call_pipeline.crm.database import create_crm_engine
    from call_pipeline.crm.schema import call_tasks, dcc_leads_follow
    from call_pipeline.crm.schema import leads_task_list as L

    engine = create_crm_engine(url)
    with engine.connect() as conn:
        task_type = conn.execute(sa.select(call_tasks.c.task_type).where(call_tasks.c.id == task_id)).scalar()
        row = conn.execute(sa.select(
            sa.func.count(L.c.call_job_id), sa.func.count(L.c.leads_follow_id), sa.func.count(L.c.recording_url),
        ).where(L.c.task_id == task_id)).one()
        follows = conn.execute(sa.select(sa.func.count()).select_from(dcc_leads_follow)).scalar()
    engine.dispose()
    return {"task_type": task_type, "matched": row[0], "with_follow_up": row[1], "recordings": row[2],
            "follow_up_rows": follows}


def needed_calls(url: str, task_id: int) -> dict:
    """What a clean run must call, from the CRM: LLM calls (leads whose follow-up the LLM writes)
    and DownloadRecording calls (succeeded calls with an attempt)."""
    from call_pipeline.crm.database import create_crm_engine
    from call_pipeline.crm.schema import leads_task_list as L
    from call_pipeline.domain.followups import PLAN_LLM, plan_follow_up

    engine = create_crm_engine(url)
    llm = recordings = 0
    with engine.connect() as conn:
        for status, conversation, call_task_id in conn.execute(
                sa.select(L.c.call_status, L.c.call_conversation, L.c.call_task_id).where(L.c.task_id == task_id)):
            llm += plan_follow_up(status, conversation) == PLAN_LLM
            recordings += status == "Succeeded" and bool(call_task_id)
    engine.dispose()
    return {"llm": llm, "recordings": recordings}
