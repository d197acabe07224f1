import pytest

from call_pipeline.domain.alerts import ALERT_FORMATS, Alert, alert_payload, scrub

ALERT = Alert("42", "十一月试驾邀约", "run-1", "sync_call_task", "create_follow_ups[page_1]", "boom",
              "http://ui/runs/run-1")


def test_scrub_masks_phones_and_removes_secrets():
    text = scrub("lead 13800138000 (+86 139-0013-9000) failed with key sk-abcdef123 ", ["sk-abcdef123", ""])
    assert "13800138000" not in text and "0013-9000" not in text and "sk-abcdef123" not in text
    assert "138****8000" in text and "***" in text
    assert len(scrub("x" * 5000)) <= 800


@pytest.mark.parametrize("fmt", ALERT_FORMATS)
def test_every_format_carries_the_task_the_step_and_the_link(fmt):
    payload = alert_payload(ALERT, fmt)
    flat = str(payload)
    for value in ("42", "十一月试驾邀约", "create_follow_ups[page_1]", "http://ui/runs/run-1"):
        assert value in flat
    if fmt == "json":
        assert set(payload) == {"task_id", "task_name", "run_id", "job", "step", "error", "run_url"}


def test_an_unknown_format_is_a_clear_error():
    with pytest.raises(ValueError, match="CALL_PIPELINE_ALERT_FORMAT"):
        alert_payload(ALERT, "teams")


@pytest.mark.parametrize("fmt", ALERT_FORMATS)
def test_a_stopped_group_alert_names_the_task_its_group_and_since_when(fmt):
    from call_pipeline.domain.alerts import StoppedGroupAlert, stopped_group_payload

    alert = StoppedGroupAlert("42", "十一月试驾邀约", "jg-7", "Paused", "2026-11-30T02:00:00+00:00", 26.5,
                              "http://ui/assets/crm/leads_task_list?view=partitions&partition=42")
    payload = stopped_group_payload(alert, fmt)
    flat = str(payload)
    for value in ("42", "十一月试驾邀约", "jg-7", "Paused", "2026-11-30T02:00:00+00:00", "partition=42"):
        assert value in flat
    if fmt == "json":
        assert payload["kind"] == "job_group_stopped" and payload["stopped_hours"] == 26.5
    else:
        assert "26.5 h" in flat
    with pytest.raises(ValueError, match="CALL_PIPELINE_ALERT_FORMAT"):
        stopped_group_payload(alert, "teams")
