"""No silent default outside the demo (SPEC §12): without CALL_PIPELINE_CRM_URL a run, the sensors'
ticks, the schedule's job and `call-pipeline init-db` stop and name the variable, instead of
reading a SQLite file in the checkout and finding nothing to do."""

from __future__ import annotations

import dagster as dg
import pytest

from call_pipeline.cli import main
from call_pipeline.definitions import defs
from call_pipeline.resources import resources_from_env
from call_pipeline.sensors import make_call_task_sensor, make_late_jobs_sensor
from call_pipeline_tests.pipeline_harness import create_task, project_instance_for_test

CREDENTIALS = ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "OUTBOUNDBOT_INSTANCE_ID",
               "DASHSCOPE_API_KEY")


@pytest.fixture
def without_crm_url(monkeypatch):
    """Credentials set (so the CRM's URL is the only thing missing), CALL_PIPELINE_CRM_URL unset."""
    for name in CREDENTIALS:
        monkeypatch.setenv(name, "test-value")
    monkeypatch.delenv("CALL_PIPELINE_CRM_URL", raising=False)


@pytest.fixture
def instance():
    with project_instance_for_test() as instance:
        yield instance


def test_a_sync_run_without_the_crm_url_stops_before_its_first_step_and_names_it(mariadb_url, without_crm_url,
                                                                                 instance):
    from call_pipeline.jobs import sync_call_task

    task_id = create_task(mariadb_url, leads=[{"leads_id": 1, "leads_phone": "13700000001"}])
    instance.add_dynamic_partitions("call_tasks", [str(task_id)])
    with pytest.raises(dg.DagsterInvalidConfigError, match="CALL_PIPELINE_CRM_URL"):
        sync_call_task.execute_in_process(instance=instance, partition_key=str(task_id),
                                          resources=resources_from_env())
    assert not instance.get_runs()  # stopped as its config was resolved: no step, not even a run


def test_the_schedules_job_without_the_crm_url_stops_and_names_it(without_crm_url, instance):
    from call_pipeline.jobs import advance_task_states

    with pytest.raises(dg.DagsterInvalidConfigError, match="CALL_PIPELINE_CRM_URL"):
        advance_task_states.execute_in_process(instance=instance, resources=resources_from_env())


@pytest.mark.parametrize("sensor", [make_call_task_sensor(), make_late_jobs_sensor()], ids=lambda s: s.name)
def test_a_sensor_tick_without_the_crm_url_fails_and_names_it(without_crm_url, instance, sensor):
    resources = resources_from_env()
    context = dg.build_sensor_context(instance_ref=instance.get_ref(), definitions=defs,
                                      resources={"crm": resources["crm"], "outboundbot": resources["outboundbot"]})
    with pytest.raises(Exception, match="CALL_PIPELINE_CRM_URL") as info:
        sensor.evaluate_tick(context)
    assert "is not set" in str(info.value)


def test_init_db_without_a_url_errors_and_creates_nothing(without_crm_url, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["init-db"]) == 2
    assert "pass --url or set CALL_PIPELINE_CRM_URL" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    url = f"sqlite:///{tmp_path / 'crm.sqlite3'}"
    monkeypatch.setenv("CALL_PIPELINE_CRM_URL", url)
    assert main(["init-db"]) == 0
    assert (tmp_path / "crm.sqlite3").exists()
