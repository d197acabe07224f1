"""The benchmark's set-up for many tasks at once (`call-pipeline bench --tasks N`): the instance it
gives the daemon, and the tasks it seeds. The benchmark itself is run by hand (README "Performance")."""

from __future__ import annotations

import shutil

import dagster as dg
import sqlalchemy as sa
import yaml

from call_pipeline.crm.database import PROJECT_ROOT, create_crm_engine
from call_pipeline.crm.schema import call_tasks, leads_task_list
from call_pipeline_tools.bench import cli, crm, environment


def _home(tmp_path) -> str:
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(f"{PROJECT_ROOT}/dagster.yaml", home / "dagster.yaml")
    return str(home)


def test_the_run_queue_takes_every_task_at_once_and_still_one_run_per_task(tmp_path):
    home = _home(tmp_path)
    environment.configure_run_queue(home, 20, mysql=False, dequeue_threads=8)

    with dg.DagsterInstance.from_config(home) as instance:  # Dagster accepts the config
        queue = instance.get_concurrency_config().run_queue_config
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.run_coordinator.dequeue_use_threads and instance.run_coordinator.dequeue_num_workers == 8
        assert instance.run_coordinator.dequeue_interval_seconds == 1
    assert queue.max_concurrent_runs == 20
    assert [(limit["key"], limit["limit"]) for limit in queue.tag_concurrency_limits] == [("dagster/partition", 1)]


def test_a_few_tasks_keep_the_projects_run_limit_and_mysql_takes_the_deployments_storage(tmp_path):
    home = _home(tmp_path)
    config = environment.configure_run_queue(home, 2, mysql=True)

    with open(f"{PROJECT_ROOT}/deploy/dagster.yaml", encoding="utf-8") as handle:
        assert config["storage"] == yaml.safe_load(handle)["storage"]
    with open(f"{home}/dagster.yaml", encoding="utf-8") as handle:
        written = yaml.safe_load(handle)
    assert written["concurrency"]["runs"]["max_concurrent_runs"] == 4  # the project's, not fewer
    assert "dequeue_use_threads" not in written["run_coordinator"]["config"]


def test_each_task_has_its_own_job_group_leads_and_phones(tmp_path):
    with crm.crm_database("sqlite", str(tmp_path)) as url:
        ids = [crm.seed_task(url, 3, f"jg-bench-{n + 1}", n * 3, f" #{n + 1}") for n in range(2)]
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
    args = cli.build_parser().parse_args([])
    assert args.tasks == 1 and args.max_runs == 3


# ---- `call-pipeline bench --live` ----------------------------------------------------------------


def test_live_calls_end_within_the_spread_in_order_and_the_same_each_time():
    from call_pipeline_tools.bench.live import call_schedule

    jobs = {"jg-1": [f"a{n}" for n in range(50)], "jg-2": [f"b{n}" for n in range(50)]}
    plan = call_schedule(jobs, 240.0, seed=3)
    assert len(plan) == 100 and {job for _, _, job in plan} == {*jobs["jg-1"], *jobs["jg-2"]}
    assert [at for at, _, _ in plan] == sorted(at for at, _, _ in plan)
    assert all(0 <= at <= 240 for at, _, _ in plan) and plan[-1][0] - plan[0][0] > 120
    assert plan == call_schedule(jobs, 240.0, seed=3) and plan != call_schedule(jobs, 240.0, seed=4)


def test_watching_is_told_apart_by_the_process_serve_started():
    from call_pipeline_tools.bench.live import process_kind

    assert process_kind("/v/bin/python -m call_pipeline.daemon run -w /tmp/s/workspace.yaml") == "daemon"
    assert process_kind("/v/bin/python -m dagster api grpc -m call_pipeline.definitions -a defs") == "code server"
    assert process_kind("/v/bin/python -m dagster code-server start -m call_pipeline.definitions") == \
        "code server (reloadable proxy)"
    assert process_kind("/v/bin/python /v/bin/call-pipeline serve --no-ui") == "serve"
    assert process_kind("/v/bin/python -m call_pipeline.cli worker --queues runs") == "Celery workers"
    assert process_kind("/v/bin/python -c from multiprocessing.forkserver import main") == "runs and others"


def test_live_freshness_percentiles_are_of_the_measured_delays():
    from call_pipeline_tools.bench.live import LiveFigures

    figures = LiveFigures(1, 0, 20, latencies=[float(n) for n in range(1, 21)])
    assert (figures.percentile(0.50), figures.percentile(0.95)) == (10.0, 19.0)
    assert figures.as_dict()["freshness_s"]["max"] == 20.0


def test_the_live_cloud_rings_until_a_call_is_ended_then_answers_its_outcome(tmp_path):
    """The benchmark's cloud, through the real SDK: a live task's jobs are Executing until the
    benchmark ends them; an idle task's stay Scheduling."""
    import argparse

    from call_pipeline.clients.outboundbot import OutboundBotClient
    from call_pipeline.domain.call_results import TERMINAL_JOB_STATUSES
    from call_pipeline.resources import OutboundBotResource
    from call_pipeline_tools.bench.live import LiveCloud

    args = argparse.Namespace(seed=1, outboundbot_latency_ms=0.0, llm_latency_ms=0.0, qps_cap=1000)
    with crm.crm_database("sqlite", str(tmp_path)) as url:
        live = crm.seed_task(url, 6, "jg-live", 0)
        idle = crm.seed_task(url, 4, "jg-idle", 6)
        cloud = LiveCloud(url, [live], [idle], args)
        try:
            client = OutboundBotClient(OutboundBotResource(
                access_key_id="ak", access_key_secret="sk", instance_id="i", endpoint=cloud.endpoint,
                protocol="http").client_config())
            jobs = cloud.jobs["jg-live"]
            assert list(cloud.jobs) == ["jg-live"] and len(jobs) == 6

            def statuses(group: str) -> dict[str, str]:
                listed = client.list_jobs_by_group(group, 1, 100)["Jobs"]["List"]
                return {job["JobId"]: job["Status"] for job in listed}

            assert set(statuses("jg-live").values()) == {"Executing"}
            assert set(statuses("jg-idle").values()) == {"Scheduling"}
            ended_at = cloud.end_calls("jg-live", jobs[:2])
            now = statuses("jg-live")
            assert {now[job] for job in jobs[:2]} <= TERMINAL_JOB_STATUSES
            assert {now[job] for job in jobs[2:]} == {"Executing"}
            assert ended_at > 0 and cloud.stats()["outboundbot_requests"] == 3
        finally:
            cloud.stop()
