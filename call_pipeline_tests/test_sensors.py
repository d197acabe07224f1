"""The sensor through `build_sensor_context`, against a real CRM on MariaDB."""

import time

import dagster as dg
import pytest

from call_pipeline.definitions import defs
from call_pipeline.run_status import RETRY_GRACE_SECONDS, SYNC_JOB_NAME, partitions_with_active_runs
from call_pipeline.sensors import make_call_task_sensor, run_key_for
from call_pipeline.settings import settings
from call_pipeline_tests.pipeline_harness import create_task, project_instance_for_test


@pytest.fixture(autouse=True)
def _credentials(monkeypatch):
    # Validating a run request resolves the job's resource config, credentials included, as the
    # code server does with its own environment.
    for name in ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "OUTBOUNDBOT_INSTANCE_ID",
                 "DASHSCOPE_API_KEY"):
        monkeypatch.setenv(name, "test-value")
    # Required like them; only validated here: the sensor reads the CRM given in its resources.
    monkeypatch.setenv("CALL_PIPELINE_CRM_URL", "sqlite://")


@pytest.fixture
def instance():
    with project_instance_for_test() as instance:
        yield instance


def evaluate(instance, crm_url, simulator, cursor=None):
    """One tick; `cursor`: the previous tick's (what the daemon hands the next tick)."""
    from call_pipeline_tests.pipeline_harness import pipeline_resources

    resources = pipeline_resources(crm_url, simulator)
    resources = {"crm": resources["crm"], "outboundbot": resources["outboundbot"]}
    context = dg.build_sensor_context(instance_ref=instance.get_ref(), definitions=defs, resources=resources,
                                      cursor=cursor)
    return make_call_task_sensor().evaluate_tick(context)


def make_tasks(crm_url):
    return {
        "calling": create_task(crm_url, task_type=2, job_group_id="jg-a"),
        "calls_done": create_task(crm_url, task_type=3, job_group_id="jg-b"),
        "follow_up_done": create_task(crm_url, task_type=4, job_group_id="jg-c"),
        "created": create_task(crm_url, task_type=1, job_group_id="jg-d"),
        "no_group": create_task(crm_url, task_type=2, job_group_id=None),
        "blank_group": create_task(crm_url, task_type=3, job_group_id=""),
    }


def test_sensor_requests_runs_for_active_tasks_only_and_adds_their_partitions(mariadb_url, instance, simulator):
    tasks = make_tasks(mariadb_url)
    result = evaluate(instance, mariadb_url, simulator)
    wanted = {str(tasks["calling"]), str(tasks["calls_done"])}
    assert {r.partition_key for r in result.run_requests} == wanted
    added = {key for request in result.dynamic_partitions_requests for key in request.partition_keys}
    assert added == wanted
    assert all(r.run_key.startswith(f"task-{r.partition_key}-first-") for r in result.run_requests)


def test_sensor_does_not_relaunch_a_task_with_a_queued_or_running_run(mariadb_url, instance, simulator):
    tasks = make_tasks(mariadb_url)
    instance.add_dynamic_partitions("call_tasks", [str(tasks["calling"]), str(tasks["calls_done"])])
    job = defs.resolve_job_def(SYNC_JOB_NAME)
    # (a QUEUED run needs a code-location origin to be created; it is filtered the same way)
    for status in (dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTED):
        run = instance.create_run_for_job(job, tags={"dagster/partition": str(tasks["calling"])}, status=status)
        result = evaluate(instance, mariadb_url, simulator)
        assert {r.partition_key for r in result.run_requests} == {str(tasks["calls_done"])}
        assert result.dynamic_partitions_requests == []  # both known already
        instance.report_run_failed(run)
    # once the run has ended the task is requested again
    result = evaluate(instance, mariadb_url, simulator)
    assert str(tasks["calling"]) in {r.partition_key for r in result.run_requests}


def test_a_task_gets_a_run_only_when_there_is_work():
    class Last:  # a run record: its tags and when it ended
        def __init__(self, progress, ended):
            self.dagster_run = type("Run", (), {"tags": {"call_pipeline/progress": progress}})()
            self.end_time, self.start_time = ended, ended

    now = 1_000_000.0
    window = int(now // settings().sensor_interval_seconds)
    assert run_key_for(7, "10/3", 0, None, now) == f"task-7-first-10/3-{window}"
    assert run_key_for(7, "10/3", 0, Last("10/3", now - 60), now) is None  # nothing changed
    assert run_key_for(7, "10/4", 0, Last("10/3", now - 60), now) == f"task-7-progress-10/4-{window}"
    assert run_key_for(7, "unknown", 0, Last("10/3", now - 60), now) is None
    assert run_key_for(7, "10/3", 2, Last("10/3", now - 60), now).startswith("task-7-work-")
    late = run_key_for(7, "10/3", 0, Last("10/3", now - settings().sensor_max_interval_seconds), now)
    assert late.startswith("task-7-every-")


def test_a_task_whose_runs_failed_for_good_is_asked_again_in_the_next_window():
    """Run keys are remembered forever: a key without its window would be spent by the first run
    (and its retries) that failed, and the task would never be run again while nothing changed."""
    class Synced:  # the last successful run saw 10/3
        dagster_run = type("Run", (), {"tags": {"call_pipeline/progress": "10/3"}})()
        end_time = start_time = 0.0

    now = 1_000_000.0
    later = now + settings().sensor_interval_seconds
    for last, progress in ((None, "10/3"), (Synced(), "10/4")):
        first = run_key_for(7, progress, 0, last, now)
        assert first == run_key_for(7, progress, 0, last, now + 1)  # one run per window
        assert run_key_for(7, progress, 0, last, later) not in (None, first)


def test_sensor_with_no_active_task_requests_nothing(mariadb_url, instance, simulator):
    create_task(mariadb_url, task_type=4, job_group_id="jg-z")
    result = evaluate(instance, mariadb_url, simulator)
    assert result.run_requests == [] and result.dynamic_partitions_requests == []


def test_definitions_load_with_sensor_and_schedule_running_by_default():
    assert defs.resolve_sensor_def("call_task_sensor").default_status == dg.DefaultSensorStatus.RUNNING
    schedule = defs.resolve_schedule_def("advance_task_states_schedule")
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    assert schedule.cron_schedule == settings().state_schedule_cron
    job = defs.resolve_job_def(SYNC_JOB_NAME)
    assert job.partitions_def.name == "call_tasks"
    tags = {node.name: node.definition.tags for node in job.graph.nodes}
    assert tags["match_job_page"]["dagster-celery/queue"] == "sync_queue"
    assert tags["fetch_call_results"]["dagster-celery/queue"] == "query_queue"
    assert tags["fetch_recordings"]["dagster-celery/queue"] == "download_queue"
    assert tags["create_follow_ups"]["dagster-celery/queue"] == "ai_queue"
    pools = {node.name: node.definition.pool for node in job.graph.nodes}
    assert pools["create_follow_ups"] == "ai_queue" and pools["fetch_recordings"] == "download_queue"


def test_a_job_that_comes_after_the_task_reached_4_is_matched_and_followed_up(mariadb_url, simulator, instance):
    """The late-jobs sensor sees (one call) that a concluded task's group grew and
    requests a run; the run matches the new job and completes its lead; the task stays at 4."""
    from call_pipeline.executors import IN_PROCESS_RUN_CONFIG
    from call_pipeline.ops import LATE_JOBS_TAG
    from call_pipeline.sensors import make_late_jobs_sensor
    from call_pipeline_tests.pipeline_harness import new_reference, pipeline_resources, run_sync, snapshot
    from call_pipeline_tests.test_sync_job import create_task_leads
    from call_pipeline_tools.simulator.scenarios import build_job_group

    task_id = create_task(mariadb_url, job_group_id="jg-late", leads=[])
    leads = [{"leads_id": i, "leads_phone": f"1350000{i:04d}", "reference_id": new_reference(task_id, i)}
             for i in range(1, 21)]
    create_task_leads(mariadb_url, task_id, leads)
    group = build_job_group("jg-late", leads[:19], task_id=task_id, seed=4, status_mix={"Succeeded": 1.0})
    simulator.state.add_job_group(group)
    assert run_sync(mariadb_url, simulator, task_id, instance).success
    assert snapshot(mariadb_url, task_id).task_type == 4

    resources = pipeline_resources(mariadb_url, simulator)
    resources = {"crm": resources["crm"], "outboundbot": resources["outboundbot"]}

    cursor = None

    def tick():
        nonlocal cursor
        context = dg.build_sensor_context(instance_ref=instance.get_ref(), definitions=defs, resources=resources,
                                          cursor=cursor)
        result = make_late_jobs_sensor().evaluate_tick(context)
        cursor = result.cursor or cursor
        return result

    assert tick().run_requests == []  # nothing new: no run
    calls_before = simulator.state.stats()["outboundbot_requests"]
    late = build_job_group("jg-late-2", leads[19:], task_id=task_id, seed=6, status_mix={"Succeeded": 1.0})
    simulator.state.add_jobs("jg-late", late["jobs"])
    result = tick()
    assert simulator.state.stats()["outboundbot_requests"] == calls_before + 1  # one DescribeJobGroup
    assert [r.partition_key for r in result.run_requests] == [str(task_id)]
    request = result.run_requests[0]
    assert request.tags[LATE_JOBS_TAG] == "true" and request.tags["call_pipeline/task_name"]
    assert request.run_config == IN_PROCESS_RUN_CONFIG  # one late job: a small run (the default multiprocess)

    assert run_sync(mariadb_url, simulator, task_id, instance, tags=request.tags).success
    crm = snapshot(mariadb_url, task_id)
    lead = crm.leads[20]
    assert lead["call_job_id"] == late["jobs"][0]["JobId"] and lead["call_status"] == "Succeeded"
    assert lead["leads_follow_id"] is not None and lead["recording_url"]
    assert crm.task_type == 4
    assert tick().run_requests == []  # done: the group and the task agree again


def test_sensor_leaves_a_failed_run_to_its_automatic_retry(mariadb_url, instance, simulator):
    tasks = make_tasks(mariadb_url)
    instance.add_dynamic_partitions("call_tasks", [str(tasks["calling"])])
    job = defs.resolve_job_def(SYNC_JOB_NAME)
    run = instance.create_run_for_job(job, tags={"dagster/partition": str(tasks["calling"])},
                                      status=dg.DagsterRunStatus.STARTED)
    instance.report_run_failed(run)
    instance.add_run_tags(run.run_id, {"dagster/will_retry": "true"})  # what the daemon marks
    requested = {r.partition_key for r in evaluate(instance, mariadb_url, simulator).run_requests}
    assert str(tasks["calling"]) not in requested
    # a retry that never came (it could not be launched) holds the task only for a while
    assert str(tasks["calling"]) in partitions_with_active_runs(instance)
    assert str(tasks["calling"]) not in partitions_with_active_runs(
        instance, now=time.time() + RETRY_GRACE_SECONDS + 5)
    # once the retry came (and ended), the task is the sensor's again
    retry = instance.create_run_for_job(job, tags={"dagster/partition": str(tasks["calling"]),
                                                   "dagster/parent_run_id": run.run_id},
                                        status=dg.DagsterRunStatus.STARTED)
    instance.report_run_failed(retry)
    requested = {r.partition_key for r in evaluate(instance, mariadb_url, simulator).run_requests}
    assert str(tasks["calling"]) in requested


def test_of_100_quiet_tasks_only_the_10_whose_groups_progress_get_runs(mariadb_url, instance, simulator):
    """One tick over 100 active tasks, each synced by a completed run that saw its group's
    progress: after 10 groups move on, the tick makes one call (ListJobGroups) and requests
    exactly those 10 runs (before: a run per task per interval, whatever happened)."""
    from dagster._core.events import DagsterEvent, DagsterEventType

    from call_pipeline.ops import PROGRESS_TAG
    from call_pipeline.sensors import progress_tag, read_watched_groups
    from call_pipeline_tests.pipeline_harness import new_reference, pipeline_resources
    from call_pipeline_tests.test_sync_job import create_task_leads
    from call_pipeline_tools.simulator.scenarios import build_job_group

    job = defs.resolve_job_def(SYNC_JOB_NAME)
    tasks = {}
    for n in range(100):
        group_id = f"jg-quiet-{n}"
        task_id = create_task(mariadb_url, job_group_id=group_id, leads=[])
        lead = {"leads_id": 1, "leads_phone": f"1340000{n:04d}", "reference_id": new_reference(task_id, 1)}
        create_task_leads(mariadb_url, task_id, [lead])
        group = build_job_group(group_id, [lead], task_id=task_id, seed=n, status_mix={"Succeeded": 1.0})
        group["jobs"][0]["Status"] = "Executing"  # still calling: the CRM holds no work for it
        simulator.state.add_job_group(group)
        tasks[task_id] = group_id
    instance.add_dynamic_partitions("call_tasks", [str(t) for t in tasks])
    seen = read_watched_groups(pipeline_resources(mariadb_url, simulator)["outboundbot"].get_client(),
                               set(tasks.values()), {}, None)
    for task_id, group_id in tasks.items():
        run = instance.create_run_for_job(job, status=dg.DagsterRunStatus.STARTED, tags={
            "dagster/partition": str(task_id), PROGRESS_TAG: progress_tag(seen[group_id])})
        instance.report_dagster_event(DagsterEvent(DagsterEventType.RUN_SUCCESS.value, job_name=job.name),
                                      run_id=run.run_id)
    quiet = evaluate(instance, mariadb_url, simulator)
    assert quiet.run_requests == []  # nothing moved

    moving = list(tasks)[:10]
    for task_id in moving:
        simulator.state.set_job_status(simulator.state.jobs_of_group(tasks[task_id])[0]["JobId"], "Succeeded")
    calls_before = simulator.state.stats()["outboundbot_requests"]
    result = evaluate(instance, mariadb_url, simulator, cursor=quiet.cursor)
    assert sorted(int(r.partition_key) for r in result.run_requests) == sorted(moving)
    assert simulator.state.stats()["outboundbot_requests"] == calls_before + 1  # 100 groups: one page


def test_a_run_the_sensor_did_not_launch_records_the_progress_it_saw(mariadb_url, instance, simulator):
    """A backfill or Launchpad run carries no progress tag from the sensor: it records the group's
    progress itself (DescribeJobGroup), so the sensor does not launch a run for nothing after it."""
    from call_pipeline.ops import PROGRESS_TAG, TASK_NAME_TAG
    from call_pipeline_tests.pipeline_harness import new_reference, run_sync
    from call_pipeline_tests.test_sync_job import create_task_leads
    from call_pipeline_tools.simulator.scenarios import build_job_group

    task_id = create_task(mariadb_url, name="周末试驾邀约", job_group_id="jg-backfill", leads=[])
    leads = [{"leads_id": n, "leads_phone": f"1350000{n:04d}", "reference_id": new_reference(task_id, n)}
             for n in (1, 2, 3)]
    create_task_leads(mariadb_url, task_id, leads)
    group = build_job_group("jg-backfill", leads, task_id=task_id, seed=4, status_mix={"Succeeded": 1.0})
    group["jobs"][0]["Status"] = "Executing"  # one call still going: the task stays at 2
    simulator.state.add_job_group(group)
    result = run_sync(mariadb_url, simulator, task_id, instance)  # no tags, as from a backfill
    assert result.success
    tags = instance.get_run_by_id(result.run_id).tags
    assert tags[PROGRESS_TAG] == "3/2" and tags[TASK_NAME_TAG] == "周末试驾邀约"
    assert str(task_id) not in {r.partition_key for r in evaluate(instance, mariadb_url, simulator).run_requests}
    # and when the group moves on, the sensor sees it
    simulator.state.set_job_status(group["jobs"][0]["JobId"], "Succeeded")
    requested = {r.partition_key: r.run_key for r in evaluate(instance, mariadb_url, simulator).run_requests}
    assert requested[str(task_id)].startswith(f"task-{task_id}-progress-3/3-")


def test_a_run_for_a_task_with_nothing_to_do_still_carries_its_name(mariadb_url, instance, simulator):
    from call_pipeline.ops import TASK_NAME_TAG
    from call_pipeline_tests.pipeline_harness import run_sync

    task_id = create_task(mariadb_url, name="已完成的任务", task_type=4, job_group_id="jg-done")
    result = run_sync(mariadb_url, simulator, task_id, instance)  # a backfill over a concluded task
    assert result.success
    assert instance.get_run_by_id(result.run_id).tags[TASK_NAME_TAG] == "已完成的任务"


def test_a_run_with_little_work_is_asked_to_run_in_process_and_a_first_sync_is_not(mariadb_url, instance,
                                                                                    simulator, monkeypatch):
    """CALL_PIPELINE_IN_PROCESS_MAX_JOBS on the multiprocess executor: the first sync of a group
    (every job to match) keeps the executor's steps in processes of their own; once the task is
    synced, a run for a call that ended runs in process."""
    from call_pipeline.executors import IN_PROCESS_RUN_CONFIG
    from call_pipeline_tests.pipeline_harness import new_reference, run_sync
    from call_pipeline_tests.test_sync_job import create_task_leads
    from call_pipeline_tools.simulator.scenarios import build_job_group

    monkeypatch.setenv("CALL_PIPELINE_EXECUTOR", "multiprocess")
    monkeypatch.setenv("CALL_PIPELINE_IN_PROCESS_MAX_JOBS", "4")
    settings.cache_clear()
    task_id = create_task(mariadb_url, job_group_id="jg-sized", leads=[])
    leads = [{"leads_id": n, "leads_phone": f"1360000{n:04d}", "reference_id": new_reference(task_id, n)}
             for n in range(1, 6)]
    create_task_leads(mariadb_url, task_id, leads)
    group = build_job_group("jg-sized", leads, task_id=task_id, seed=5, status_mix={"Succeeded": 1.0})
    for job in group["jobs"][:3]:
        job["Status"] = "Executing"
    simulator.state.add_job_group(group)
    try:
        first = evaluate(instance, mariadb_url, simulator).run_requests
        assert [r.partition_key for r in first] == [str(task_id)]
        assert first[0].run_config == {}  # 5 jobs to match and 2 completed: more than 4
        assert run_sync(mariadb_url, simulator, task_id, instance).success
        simulator.state.set_job_status(group["jobs"][0]["JobId"], "Succeeded")
        later = evaluate(instance, mariadb_url, simulator).run_requests
        assert [r.partition_key for r in later] == [str(task_id)]
        assert later[0].run_config == IN_PROCESS_RUN_CONFIG  # one call ended since
        monkeypatch.setenv("CALL_PIPELINE_IN_PROCESS_MAX_JOBS", "0")
        settings.cache_clear()
        assert evaluate(instance, mariadb_url, simulator).run_requests[0].run_config == {}
        monkeypatch.setenv("CALL_PIPELINE_IN_PROCESS_MAX_JOBS", "4")
        monkeypatch.setenv("CALL_PIPELINE_EXECUTOR", "in_process")
        settings.cache_clear()
        assert evaluate(instance, mariadb_url, simulator).run_requests[0].run_config == {}  # already in process
    finally:
        monkeypatch.undo()
        settings.cache_clear()
