"""Helpers for tests that run the Dagster jobs against a real CRM and the simulator."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime

import dagster as dg
import sqlalchemy as sa

from call_pipeline.crm.database import get_crm_engine
from call_pipeline.crm.schema import call_tasks, dcc_leads_follow, leads_task_list
from call_pipeline.jobs import sync_call_task
from call_pipeline.partitions import call_tasks_partitions
from call_pipeline.resources import CrmDatabase, DashScopeResource, OutboundBotResource, RecordingArchiveResource
from call_pipeline.settings import env_name

ORGANIZATION = 9
TEST_ACCESS_KEY_SECRET = "test-secret-5f1d0c"
TEST_DASHSCOPE_KEY = "sk-test-key-8a2b71"


# The project's instance class, as both dagster.yaml files name it: with no storage setting, the
# embedded default's SQLite storage (call_pipeline/storage.py). Dagster's own would load its
# migration scripts in every step process and build an engine for every query.
PROJECT_INSTANCE_CLASS = {"instance_class": {"module": "call_pipeline.instance", "class": "PipelineInstance"}}


@contextlib.contextmanager
def project_instance_for_test(overrides: Mapping | None = None, **kwargs) -> Iterator[dg.DagsterInstance]:
    """`dg.instance_for_test` on the project's instance class (`kwargs`: instance_for_test's)."""
    with dg.instance_for_test(overrides={**PROJECT_INSTANCE_CLASS, **(overrides or {})}, **kwargs) as instance:
        yield instance


def _backoff(model: type, *fields: str) -> dict:
    """`model`'s backoff settings that the environment sets."""
    return {field: os.environ[env_name(model, field)] for field in fields
            if os.environ.get(env_name(model, field))}


def pipeline_resources(crm_url: str, simulator, *, max_qps: float = 1000.0, max_concurrency: int = 8,
                       read_timeout_ms: int = 5000, request_timeout_s: float = 10.0,
                       recording_store: str | None = None, recording_public_base_url: str | None = None,
                       recording_s3_endpoint: str | None = None) -> dict:
    return {
        "recording_archive": RecordingArchiveResource(
            store_url=recording_store, public_base_url=recording_public_base_url, s3_endpoint=recording_s3_endpoint),
        "crm": CrmDatabase(url=crm_url),
        # The SDKs' backoff comes from the environment, as in a deployment (conftest.py shortens it).
        "outboundbot": OutboundBotResource(
            access_key_id="test-ak", access_key_secret=TEST_ACCESS_KEY_SECRET, instance_id="inst-test",
            endpoint=simulator.endpoint, protocol="http", max_qps=max_qps, read_timeout_ms=read_timeout_ms,
            **_backoff(OutboundBotResource, "backoff_ms", "max_backoff_ms"),
        ),
        "dashscope": DashScopeResource(
            api_key=TEST_DASHSCOPE_KEY, base_http_api_url=simulator.dashscope_base_url,
            max_concurrency=max_concurrency, request_timeout_s=request_timeout_s,
            **_backoff(DashScopeResource, "backoff_s", "max_backoff_s"),
        ),
    }


def create_task(crm_url: str, *, name: str = "测试任务", task_type: int = 2, job_group_id: str | None = "jg-1",
                leads: list[dict] | None = None) -> int:
    engine = get_crm_engine(crm_url)
    with engine.begin() as conn:
        task_id = int(conn.execute(call_tasks.insert().values(
            task_name=name, organization_id=ORGANIZATION, task_type=task_type, job_group_id=job_group_id,
            created_time=datetime(2026, 11, 1), updated_time=datetime(2026, 11, 1))).inserted_primary_key[0])
        if leads:
            conn.execute(leads_task_list.insert(), [{"task_id": task_id, "organization_id": ORGANIZATION, **lead}
                                                    for lead in leads])
    return task_id


def new_reference(task_id: int, leads_id: int) -> str:
    return f"{task_id}{ORGANIZATION}{leads_id}"


def run_sync(crm_url: str, simulator, task_id: int, instance: dg.DagsterInstance, *,
             paging: dict | None = None, executor: str = "in_process", tags: dict | None = None, **resource_kw):
    """`paging`: config of list_job_pages (page_size, pages_per_batch). `executor`: in_process
    (`execute_in_process`, resources given here), or another executor of `sync_call_task`: then
    the run goes through `execute_job` on a reconstructable job whose step processes read the
    resources from the environment, as in production (`resource_kw`: max_qps, max_concurrency)."""
    if str(task_id) not in instance.get_dynamic_partitions(call_tasks_partitions.name):
        instance.add_dynamic_partitions(call_tasks_partitions.name, [str(task_id)])
    if executor != "in_process":
        from call_pipeline_tests.reliability.harness import launch_run, pipeline_env

        with pipeline_env(crm_url, simulator, **resource_kw):
            return launch_run(instance, task_id, executor=executor,
                              paging=paging or {"page_size": 100, "pages_per_batch": 10})
    return sync_call_task.execute_in_process(
        instance=instance, partition_key=str(task_id), raise_on_error=False, tags=tags,
        resources=pipeline_resources(crm_url, simulator, **resource_kw),
        run_config={"ops": {"list_job_pages": {"config": paging}}} if paging else None,
    )


@dataclass
class CrmSnapshot:
    leads: dict[int, dict]
    follow_ups: list[dict]
    task_type: int


IGNORED_COLUMNS = {"updated_time"}


def snapshot(crm_url: str, task_id: int) -> CrmSnapshot:
    engine = get_crm_engine(crm_url)
    with engine.connect() as conn:
        leads = {
            int(row.leads_id): {k: v for k, v in row._mapping.items() if k not in IGNORED_COLUMNS}
            for row in conn.execute(sa.select(leads_task_list).where(leads_task_list.c.task_id == task_id))
        }
        lead_ids = [lead["leads_id"] for lead in leads.values()]
        follow_ups = [dict(r._mapping) for r in conn.execute(
            sa.select(dcc_leads_follow).where(dcc_leads_follow.c.leads_id.in_(lead_ids)).order_by(dcc_leads_follow.c.id))]
        task_type = conn.execute(sa.select(call_tasks.c.task_type).where(call_tasks.c.id == task_id)).scalar_one()
    return CrmSnapshot(leads, follow_ups, int(task_type))


def expected_jobs_by_lead(group: dict) -> dict[int, str]:
    """leads_id -> JobId, from the simulator scenario's hidden `_sim` data."""
    return {int(job["_sim"]["leads_id"]): job["JobId"] for job in group["jobs"]
            if job.get("_sim", {}).get("leads_id") is not None}
