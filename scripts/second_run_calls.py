"""The cloud calls of a live task's later runs (README, "The graph": a run costs what its new work
costs). 2,000 leads on a MariaDB database of its own, 30% of their jobs still calling after run 1;
100 of those end before run 2; nothing changes before run 3; the group never grows. `sync_call_task`
runs in process against the simulator (no latency); each run's calls per action are printed.

    .venv/bin/python scripts/second_run_calls.py
    PYTHONPATH=/path/to/another/checkout .venv/bin/python scripts/second_run_calls.py   # its code
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid

MARIADB = os.environ.get("CALL_PIPELINE_TEST_MYSQL_URL", "mysql+pymysql://root:@127.0.0.1:3306")
LEADS = 2000


def main() -> None:
    os.environ.setdefault("CALL_PIPELINE_OP_RETRY_DELAY_SECONDS", "0")
    os.environ.setdefault("CALL_PIPELINE_STATE_DIR", tempfile.mkdtemp(prefix="call-pipeline-limits-"))
    import dagster as dg
    import sqlalchemy as sa

    import call_pipeline
    from call_pipeline.clients.proxies import drop_proxy_variables
    from call_pipeline.crm.database import create_crm_engine, create_crm_tables
    from call_pipeline.crm.schema import leads_task_list
    from call_pipeline_tests.pipeline_harness import ORGANIZATION, create_task, new_reference, run_sync
    from call_pipeline_tools.simulator.scenarios import build_job_group
    from call_pipeline_tools.simulator.server import start_simulator

    drop_proxy_variables()
    print("code:", os.path.dirname(call_pipeline.__file__))
    name = f"call_pipeline_calls_{uuid.uuid4().hex[:8]}"
    server = sa.create_engine(MARIADB, isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    url = f"{MARIADB}/{name}?charset=utf8mb4"
    try:
        engine = create_crm_engine(url)
        create_crm_tables(engine)
        task_id = create_task(url, job_group_id="jg-live", leads=[])
        leads = [{"leads_id": i, "leads_phone": f"1361000{i:04d}", "reference_id": new_reference(task_id, i)}
                 for i in range(1, LEADS + 1)]
        with engine.begin() as conn:
            conn.execute(leads_task_list.insert(),
                         [{"task_id": task_id, "organization_id": ORGANIZATION, **lead} for lead in leads])
        engine.dispose()
        group = build_job_group("jg-live", leads, task_id=task_id, seed=3,
                                status_mix={"Succeeded": 0.5, "Failed": 0.2, "Executing": 0.3})
        calling = [job["JobId"] for job in group["jobs"] if job["Status"] == "Executing"]
        simulator = start_simulator()
        simulator.state.add_job_group(group)
        figures = {}
        try:
            with dg.instance_for_test() as instance:
                for run, before in ((1, None), (2, lambda: simulator.state.advance("jg-live", 1, calling[:100])),
                                    (3, None)):
                    if before:
                        before()
                    simulator.state.reset_stats()
                    result = run_sync(url, simulator, task_id, instance)
                    stats = simulator.state.stats()
                    figures[f"run {run}"] = {"success": result.success, "requests": stats["requests"],
                                             "ListJobs job ids": stats.get("list_jobs_job_ids"),
                                             "LLM calls": stats["dashscope_requests"]}
        finally:
            simulator.stop()
        print(json.dumps(figures, indent=1))
    finally:
        with server.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))


if __name__ == "__main__":
    main()
