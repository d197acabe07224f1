"""The benchmark's set-up for many tasks at once (`call-pipeline bench --tasks N`): the instance it
gives the daemon, and the tasks it seeds. The benchmark itself is run by hand (README "Performance")."""

from __future__ import annotations

import shutil

import dagster as dg
import sqlalchemy as sa
import yaml

from call_pipeline import bench
from call_pipeline.crm.database import create_crm_engine
from call_pipeline.crm.schema import call_tasks, leads_task_list


def _home(tmp_path) -> str:
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(f"{bench._project_root()}/dagster.yaml", home / "dagster.yaml")
    return str(home)


def test_the_run_queue_takes_every_task_at_once_and_still_one_run_per_task(tmp_path):
    home = _home(tmp_path)
    bench.configure_run_queue(home, 20, mysql=False, dequeue_threads=8)

    with dg.DagsterInstance.from_config(home) as instance:  # Dagster accepts the config
        queue = instance.get_concurrency_config().run_queue_config
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.run_coordinator.dequeue_use_threads and instance.run_coordinator.dequeue_num_workers == 8
        assert instance.run_coordinator.dequeue_interval_seconds == 1
    assert queue.max_concurrent_runs == 20
    assert [(limit["key"], limit["limit"]) for limit in queue.tag_concurrency_limits] == [("dagster/partition", 1)]


def test_a_few_tasks_keep_the_projects_run_limit_and_mysql_takes_the_deployments_storage(tmp_path):
    home = _home(tmp_path)
    config = bench.configure_run_queue(home, 2, mysql=True)

    with open(f"{bench._project_root()}/deploy/dagster.yaml", encoding="utf-8") as handle:
        assert config["storage"] == yaml.safe_load(handle)["storage"]
    with open(f"{home}/dagster.yaml", encoding="utf-8") as handle:
        written = yaml.safe_load(handle)
    assert written["concurrency"]["runs"]["max_concurrent_runs"] == 4  # the project's, not fewer
    assert "dequeue_use_threads" not in written["run_coordinator"]["config"]


def test_each_task_has_its_own_job_group_leads_and_phones(tmp_path):
    with bench.crm_database("sqlite", str(tmp_path)) as url:
        ids = [bench.seed_task(url, 3, f"jg-bench-{n + 1}", n * 3, f" #{n + 1}") for n in range(2)]
        engine = create_crm_engine(url)
        with engine.connect() as conn:
            groups = conn.execute(sa.select(call_tasks.c.job_group_id).order_by(call_tasks.c.id)).scalars().all()
            leads = conn.execute(sa.select(leads_task_list.c.task_id, leads_task_list.c.leads_id,
                                           leads_task_list.c.leads_phone)).all()
        engine.dispose()
    assert groups == ["jg-bench-1", "jg-bench-2"]
    assert len({lead.leads_id for lead in leads}) == len({lead.leads_phone for lead in leads}) == 6
    assert {lead.task_id for lead in leads} == set(ids)


def test_one_task_is_the_default_and_needs_no_daemon():
    args = bench.build_parser().parse_args([])
    assert args.tasks == 1 and args.max_runs == 3
