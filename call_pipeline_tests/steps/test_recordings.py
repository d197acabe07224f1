"""Step 4 with the recording archive, in `sync_call_task` runs against MariaDB and the simulator:
on a folder and on a real S3-compatible server; an object already archived is not fetched again;
a signed URL that expired is asked for anew; an archive that fails leaves the lead's recording
empty with a warning, fails the run after the rest is saved, and the next run archives it."""

from __future__ import annotations

import pytest

from call_pipeline.clients.recording_store import recording_key
from call_pipeline_tests.pipeline_harness import (
    create_task,
    new_reference,
    project_instance_for_test,
    run_sync,
    snapshot,
)
from call_pipeline_tools.simulator.outboundbot import mp3_bytes, wav_bytes
from call_pipeline_tools.simulator.scenarios import build_job_group

PUBLIC = "https://recordings.example.com/crm"

pytestmark = pytest.mark.usefixtures("aws_test_credentials")


@pytest.fixture
def instance():
    with project_instance_for_test() as instance:
        yield instance




def a_task(crm_url: str, simulator, n: int = 30) -> int:
    task_id = create_task(crm_url, job_group_id=f"jg-rec-{n}", leads=[])
    leads = [{"leads_id": i, "leads_phone": f"1360000{i:04d}", "reference_id": new_reference(task_id, i)}
             for i in range(1, n + 1)]
    from call_pipeline_tests.test_sync_job import create_task_leads

    create_task_leads(crm_url, task_id, leads)
    simulator.state.add_job_group(build_job_group(f"jg-rec-{n}", leads, task_id=task_id, seed=3,
                                                  status_mix={"Succeeded": 0.7, "Failed": 0.3}))
    return task_id


def succeeded(crm_url: str, task_id: int) -> list[dict]:
    return [lead for lead in snapshot(crm_url, task_id).leads.values() if lead["call_status"] == "Succeeded"]


def test_recordings_archived_in_a_folder(mariadb_url, simulator, instance, tmp_path):
    task_id = a_task(mariadb_url, simulator)
    store = tmp_path / "archive"
    result = run_sync(mariadb_url, simulator, task_id, instance, recording_store=store.as_uri(),
                      recording_public_base_url=PUBLIC)
    assert result.success
    leads = succeeded(mariadb_url, task_id)
    assert len(leads) >= 10
    for lead in leads:
        key = recording_key(task_id, lead["call_task_id"])
        assert lead["recording_url"] == f"{PUBLIC}/{key}"
        assert (store / key).read_bytes() == wav_bytes(lead["call_task_id"])
    assert simulator.state.stats()["requests"]["DownloadRecording"] == len(leads)


def test_recordings_archived_on_s3_and_never_fetched_twice(mariadb_url, simulator, instance, s3):
    task_id = a_task(mariadb_url, simulator)
    bucket = s3.new_bucket()
    store = f"s3://{bucket}/calls"
    # one lead's recording is in the archive already (a run that stored it and died before the CRM
    # write): it is not fetched again, and DownloadRecording is not called for it
    jobs = simulator.state.jobs_of_group("jg-rec-30")
    done = next(j for j in jobs if j["Status"] == "Succeeded" and j.get("Tasks"))
    done_task = done["Tasks"][-1]["TaskId"]
    s3.client().put_object(Bucket=bucket, Key=f"calls/{recording_key(task_id, done_task)}", Body=wav_bytes(done_task))

    result = run_sync(mariadb_url, simulator, task_id, instance, recording_store=store,
                      recording_s3_endpoint=s3.endpoint)
    assert result.success
    leads = succeeded(mariadb_url, task_id)
    for lead in leads:
        key = f"calls/{recording_key(task_id, lead['call_task_id'])}"
        assert lead["recording_url"] == f"s3://{bucket}/{key}"
        body = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        assert body == wav_bytes(lead["call_task_id"])
    stats = simulator.state.stats()
    assert stats["requests"]["DownloadRecording"] == len(leads) - 1
    assert stats["download_recording_repeats"] == 0


def test_an_expired_signed_url_is_asked_for_anew(mariadb_url, simulator, instance, tmp_path):
    task_id = a_task(mariadb_url, simulator)
    simulator.state.expire_next_recording_urls(3)
    result = run_sync(mariadb_url, simulator, task_id, instance, recording_store=(tmp_path / "a").as_uri())
    assert result.success
    leads = succeeded(mariadb_url, task_id)
    assert all(lead["recording_url"] for lead in leads)
    assert simulator.state.stats()["requests"]["DownloadRecording"] == len(leads) + 3
    messages = [e.message or "" for e in instance.all_logs(result.run_id)]
    assert sum("signed URL had expired" in m for m in messages) == 3


def test_an_archive_that_fails_leaves_the_url_empty_and_the_next_run_archives_it(mariadb_url, simulator,
                                                                                 instance, s3):
    task_id = a_task(mariadb_url, simulator)
    bucket = f"missing-{task_id}"  # no such bucket: every upload is refused
    result = run_sync(mariadb_url, simulator, task_id, instance, recording_store=f"s3://{bucket}",
                      recording_s3_endpoint=s3.endpoint)
    assert not result.success
    crm = snapshot(mariadb_url, task_id)
    assert not any(lead["recording_url"] for lead in crm.leads.values())
    # the rest was saved: every follow-up is written; the task is not concluded
    assert all(lead["leads_follow_id"] for lead in crm.leads.values() if lead["call_job_id"])
    assert crm.task_type == 2
    messages = "\n".join(e.message or "" for e in instance.all_logs(result.run_id))
    assert "recording not fetched (retried next run)" in messages and "NoSuchBucket" in messages

    s3.client().create_bucket(Bucket=bucket)
    again = run_sync(mariadb_url, simulator, task_id, instance, recording_store=f"s3://{bucket}",
                     recording_s3_endpoint=s3.endpoint)
    assert again.success
    leads = succeeded(mariadb_url, task_id)
    assert all(lead["recording_url"] == f"s3://{bucket}/{recording_key(task_id, lead['call_task_id'])}"
               for lead in leads)
    assert snapshot(mariadb_url, task_id).task_type == 4


def test_each_recording_is_kept_with_the_extension_of_its_format(mariadb_url, simulator, instance, tmp_path):
    task_id = create_task(mariadb_url, job_group_id="jg-rec-mp3", leads=[])
    leads = [{"leads_id": i, "leads_phone": f"1360000{i:04d}", "reference_id": new_reference(task_id, i)}
             for i in range(1, 9)]
    from call_pipeline_tests.test_sync_job import create_task_leads

    create_task_leads(mariadb_url, task_id, leads)
    mp3_leads = {2, 3, 5, 8}
    group = build_job_group("jg-rec-mp3", leads, task_id=task_id, seed=3, status_mix={"Succeeded": 1.0},
                            special_cases={i: "recording:mp3" for i in mp3_leads})
    simulator.state.add_job_group(group)
    store = tmp_path / "archive"
    # one MP3 recording is in the archive already (a run that stored it and died before the CRM
    # write): it is not fetched again, and DownloadRecording is not called for it
    done = next(j for j in group["jobs"] if j["_sim"]["leads_id"] == 5)["Tasks"][-1]["TaskId"]
    (store / recording_key(task_id, done, "mp3")).parent.mkdir(parents=True)
    (store / recording_key(task_id, done, "mp3")).write_bytes(mp3_bytes(done))

    result = run_sync(mariadb_url, simulator, task_id, instance, recording_store=store.as_uri(),
                      recording_public_base_url=PUBLIC)
    assert result.success
    crm = snapshot(mariadb_url, task_id)
    for leads_id, lead in crm.leads.items():
        audio = "mp3" if leads_id in mp3_leads else "wav"
        key = recording_key(task_id, lead["call_task_id"], audio)
        assert lead["recording_url"] == f"{PUBLIC}/{key}"
        assert (store / key).read_bytes() == {"mp3": mp3_bytes, "wav": wav_bytes}[audio](lead["call_task_id"])
        assert not (store / recording_key(task_id, lead["call_task_id"], {"mp3": "wav", "wav": "mp3"}[audio])).exists()
    stats = simulator.state.stats()
    assert stats["requests"]["DownloadRecording"] == len(leads) - 1
    assert stats["recording_downloads"] == len(leads) - 1
