"""Pipeline settings that are not resources: how often things run and how ops retry.
Read from the environment once, when the definitions load."""

from __future__ import annotations

import os


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from exc


# How often the sensor relaunches a run for an active task (seconds).
SENSOR_INTERVAL_SECONDS = _int("CALL_PIPELINE_SENSOR_INTERVAL_SECONDS", 300)
# How often the sensor looks at the CRM (seconds); a task is relaunched once per interval above.
SENSOR_TICK_SECONDS = _int("CALL_PIPELINE_SENSOR_TICK_SECONDS", 30)
# Cron of the schedule that advances every task's state.
STATE_SCHEDULE_CRON = os.environ.get("CALL_PIPELINE_STATE_SCHEDULE_CRON") or "*/10 * * * *"
# ListJobsByGroup page size (SPEC: 100).
DEFAULT_PAGE_SIZE = _int("CALL_PIPELINE_PAGE_SIZE", 100)
# Pages per mapped chain: their jobs are the batch that steps 2-5 work on together. Chosen by
# measurement (README "Performance"): fewer, larger batches cost fewer statements and steps.
DEFAULT_PAGES_PER_BATCH = _int("CALL_PIPELINE_PAGES_PER_BATCH", 10)
# Op retries (after the SDKs' own per-request retries): tries and first delay in seconds.
OP_MAX_RETRIES = _int("CALL_PIPELINE_OP_MAX_RETRIES", 3)
# 8 s: the retries wait 8, 24 and 56 s, so a fault that lasts fails the run within about two
# minutes (with the SDKs' own retries), while one of seconds is absorbed.
OP_RETRY_DELAY_SECONDS = _int("CALL_PIPELINE_OP_RETRY_DELAY_SECONDS", 8)
# Failure alerts: a webhook (none: no alerts), its format, and the UI's address for the run link.
ALERT_WEBHOOK_URL = os.environ.get("CALL_PIPELINE_ALERT_WEBHOOK_URL") or None
ALERT_FORMAT = (os.environ.get("CALL_PIPELINE_ALERT_FORMAT") or "json").lower()
UI_BASE_URL = (os.environ.get("CALL_PIPELINE_UI_BASE_URL") or "http://127.0.0.1:3000").rstrip("/")
# The executor of sync_call_task: multiprocess (default: measured fastest on one machine, see the
# README's "Performance"), in_process, or celery (steps on Celery workers).
EXECUTOR = os.environ.get("CALL_PIPELINE_EXECUTOR") or "multiprocess"
# multiprocess: steps at once in one run, and of those at most this many step-4 / step-5 steps (so
# that each kind keeps slots while the other runs). Chosen by measurement.
MAX_CONCURRENT_STEPS = _int("CALL_PIPELINE_MAX_CONCURRENT_STEPS", 6)
MAX_CONCURRENT_STEPS_PER_QUEUE = _int("CALL_PIPELINE_MAX_CONCURRENT_STEPS_PER_QUEUE", 2)
# celery: the broker and the result backend.
CELERY_BROKER = os.environ.get("CALL_PIPELINE_CELERY_BROKER") or "pyamqp://guest:guest@127.0.0.1:5672//"
CELERY_BACKEND = os.environ.get("CALL_PIPELINE_CELERY_BACKEND") or "redis://127.0.0.1:6379/0"
# The recording archive (step 4): file:///path or s3://bucket/prefix; unset: the CRM keeps the
# signed URL DownloadRecording gives (it expires).
RECORDING_STORE = os.environ.get("CALL_PIPELINE_RECORDING_STORE") or None
RECORDING_S3_ENDPOINT = os.environ.get("CALL_PIPELINE_RECORDING_S3_ENDPOINT") or None
RECORDING_PUBLIC_BASE_URL = os.environ.get("CALL_PIPELINE_RECORDING_PUBLIC_BASE_URL") or None
RECORDING_MAX_BYTES = _int("CALL_PIPELINE_RECORDING_MAX_BYTES", 64 * 1024 * 1024)
# Recordings fetched into the archive at once, across every step and run of the machine.
RECORDING_MAX_CONCURRENCY = _int("CALL_PIPELINE_RECORDING_MAX_CONCURRENCY", 8)
# Tasks concluded (at 4) within this many days are checked for jobs that came late.
RECONCILE_DAYS = _int("CALL_PIPELINE_RECONCILE_DAYS", 7)
# The level of what runs print to their console (the event log keeps everything).
LOG_LEVEL = (os.environ.get("CALL_PIPELINE_LOG_LEVEL") or "INFO").upper()
# The sensor relaunches a task whose group and CRM show no change at least this often (seconds).
SENSOR_MAX_INTERVAL_SECONDS = _int("CALL_PIPELINE_SENSOR_MAX_INTERVAL_SECONDS", 3600)
# Redis for the account's limits across machines (OUTBOUNDBOT_MAX_QPS, DASHSCOPE_MAX_CONCURRENCY);
# unset: they hold per machine (files under CALL_PIPELINE_STATE_DIR). Its keys start with the prefix.
REDIS_URL = os.environ.get("CALL_PIPELINE_REDIS_URL") or None
REDIS_KEY_PREFIX = os.environ.get("CALL_PIPELINE_REDIS_KEY_PREFIX") or "call_pipeline"
# Where steps hand each other their outputs: unset, the instance's storage folder (one machine);
# s3://bucket/prefix for workers that share no disk (endpoint: CALL_PIPELINE_IO_S3_ENDPOINT).
IO_STORE = os.environ.get("CALL_PIPELINE_IO_STORE") or None
IO_S3_ENDPOINT = os.environ.get("CALL_PIPELINE_IO_S3_ENDPOINT") or None
