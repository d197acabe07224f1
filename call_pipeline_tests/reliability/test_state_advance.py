"""The schedule advances every task from what the CRM says, between runs. After a run that
failed half-way (a page whose jobs were never matched), it must not conclude the task: the
leads of that page would then never be matched, since a task at 4 is never run again. The
schedule skips a task whose last sync run did not complete."""

from __future__ import annotations

import time

from call_pipeline.jobs import advance_task_states
from call_pipeline.resources import CrmDatabase
from call_pipeline_tests.reliability import scenarios
from call_pipeline_tests.reliability.harness import launch_run, settle
from call_pipeline_tests.reliability.invariant import Monitor, assert_matches_clean_run, normalized
from call_pipeline_tests.reliability.test_database_faults import when


def test_schedule_between_a_half_failed_run_and_its_rerun(mariadb_url, simulator, instance, env, clean_run):
    scenario = scenarios.mixed()
    clean = clean_run(scenario)
    scenario.install(mariadb_url, simulator)
    # the first ListJobsByGroup call (the page count, and page 1) works; then the next pages fail
    # past every retry, so page 1 is done and pages 2 and 3 are never matched
    requests = lambda: simulator.state.stats()["requests"].get("ListJobsByGroup", 0)  # noqa: E731
    injector = when(lambda: requests() >= 1,
                    lambda: simulator.state.inject_fault(action="ListJobsByGroup", status=503, times=None,
                                                               headers={"x-acs-retry-after": "50"}))
    with Monitor(mariadb_url, [scenario.task_id]):
        first = launch_run(instance, scenario.task_id)
        injector.stop()
        assert not first.success
        simulator.state.clear_faults()

        # the schedule fires (on the same Dagster instance) before anyone reruns the partition
        result = advance_task_states.execute_in_process(instance=instance,
                                                        resources={"crm": CrmDatabase(url=mariadb_url)})
        assert result.success
        assert normalized(mariadb_url, scenario.task_id)["task_type"] == 2, \
            "the schedule concluded a task whose later pages were never matched"

        time.sleep(0.1)
        settle(instance, mariadb_url, scenario.task_id)
    assert_matches_clean_run(normalized(mariadb_url, scenario.task_id), clean)
