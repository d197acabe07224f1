"""The state-advancement job that the schedule runs, on MariaDB."""

import dagster as dg

from call_pipeline.crm.database import get_crm_engine
from call_pipeline.crm.schema import leads_task_list
from call_pipeline.jobs import advance_task_states
from call_pipeline.resources import CrmDatabase
from call_pipeline_tests.pipeline_harness import create_task, project_instance_for_test, snapshot


def lead(leads_id, job=None, status=None, interested=None):
    return {"leads_id": leads_id, "call_job_id": job, "call_status": status, "is_interested": interested}


def test_advance_task_states_moves_every_task_as_far_as_spec_allows(mariadb_url):
    tasks = {
        # all leads with a job are terminal but one has no follow-up yet: 2 -> 3
        "to_3": (2, [lead(1, "j1", "Succeeded", 1), lead(2, "j2", "Failed", None)]),
        # everything done: 2 -> 3 -> 4 in one evaluation
        "to_4": (2, [lead(1, "j3", "Succeeded", 0), lead(2, "j4", "Cancelled", 2), lead(3)]),
        # from 3, everything has is_interested: 3 -> 4
        "3_to_4": (3, [lead(1, "j5", "Failed", 0)]),
        # a job still running: stays
        "stays_2": (2, [lead(1, "j6", "Executing"), lead(2, "j7", "Succeeded", 1)]),
        # no lead with a job: stays (leads without a job do not count)
        "no_jobs": (2, [lead(1, None, "Failed")]),
        # already at 4 with a lead that lost its verdict: never down
        "never_down": (4, [lead(1, "j8", "Executing")]),
    }
    ids = {}
    for name, (task_type, leads) in tasks.items():
        ids[name] = create_task(mariadb_url, task_type=task_type, job_group_id=f"jg-{name}", leads=leads)
    with project_instance_for_test() as instance:
        result = advance_task_states.execute_in_process(instance=instance,
                                                        resources={"crm": CrmDatabase(url=mariadb_url)})
    assert result.success
    got = {name: snapshot(mariadb_url, task_id).task_type for name, task_id in ids.items()}
    assert got == {"to_3": 3, "to_4": 4, "3_to_4": 4, "stays_2": 2, "no_jobs": 2, "never_down": 4}
    moved = result.output_for_node("advance_all_task_states")
    assert moved == {str(ids["to_3"]): "2 -> 3", str(ids["to_4"]): "2 -> 4", str(ids["3_to_4"]): "3 -> 4"}


def test_running_it_again_changes_nothing(mariadb_url):
    task_id = create_task(mariadb_url, task_type=2, leads=[lead(1, "j1", "Succeeded", 1)])
    with project_instance_for_test() as instance:
        for _ in range(2):
            assert advance_task_states.execute_in_process(
                instance=instance, resources={"crm": CrmDatabase(url=mariadb_url)}).success
    assert snapshot(mariadb_url, task_id).task_type == 4
    with get_crm_engine(mariadb_url).connect() as conn:
        assert conn.execute(leads_task_list.select()).rowcount == 1


def test_a_task_whose_last_sync_run_failed_is_left_to_its_rerun(mariadb_url):
    task_id = create_task(mariadb_url, task_type=2, leads=[lead(1, "j1", "Succeeded", 1)])
    with project_instance_for_test() as instance:
        job = defs_sync_job()
        run = instance.create_run_for_job(job, tags={"dagster/partition": str(task_id)},
                                          status=dg.DagsterRunStatus.NOT_STARTED)
        instance.report_run_failed(run)
        result = advance_task_states.execute_in_process(instance=instance,
                                                        resources={"crm": CrmDatabase(url=mariadb_url)})
        assert result.success and result.output_for_node("advance_all_task_states") == {}
        assert snapshot(mariadb_url, task_id).task_type == 2
        # once a run of the task has succeeded, the schedule evaluates it again
        ok = instance.create_run_for_job(job, tags={"dagster/partition": str(task_id)},
                                         status=dg.DagsterRunStatus.SUCCESS)
        assert ok.status == dg.DagsterRunStatus.SUCCESS
        result = advance_task_states.execute_in_process(instance=instance,
                                                        resources={"crm": CrmDatabase(url=mariadb_url)})
    assert result.output_for_node("advance_all_task_states") == {str(task_id): "2 -> 4"}
    assert snapshot(mariadb_url, task_id).task_type == 4


def defs_sync_job():
    from call_pipeline.jobs import sync_call_task

    return sync_call_task
