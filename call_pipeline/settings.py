"""Every setting of the pipeline, declared once: its environment variable, type, default and why.

- The resources' settings (the CRM, the clouds' credentials, endpoints and the account's limits,
  the recording archive) are the fields of the resources in `call_pipeline/resources.py`, each
  declared with `env_field`; `from_env` builds a resource from them. Secrets become Dagster
  `EnvVar`s, resolved inside each process and never stored in run config, tags or logs.
- The others (how often things run, retries, the executor, alerts, where step outputs live) are
  the fields of `PipelineSettings`, read from the environment the first time `settings()` is
  called (when the definitions load, or later), then kept; `settings.cache_clear()` reads them again.

A value that does not parse stops the loading with the variable's name and what it must be.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

import dagster as dg
from pydantic import BaseModel, Field, ValidationError, field_validator

Model = TypeVar("Model", bound=BaseModel)


class SettingError(ValueError):
    """An environment variable whose value the setting cannot take."""


def env_field(env: str, default: Any = ..., *, description: str, secret: bool = False, **constraints: Any) -> Any:
    """A setting read from the environment variable `env`; `secret`: passed on as an `EnvVar`."""
    return Field(default, description=f"{description} ({env})",
                 json_schema_extra={"env": env, "secret": secret}, repr=not secret, **constraints)


def env_name(model: type[BaseModel], field: str) -> str:
    """The environment variable of `model`'s setting `field`."""
    return model.model_fields[field].json_schema_extra["env"]


def from_env(model: type[Model], environ: Mapping[str, str] | None = None, *, secrets_as_env_vars: bool = True,
             **overrides: Any) -> Model:
    """`model` with each `env_field` taken from the environment where it is set (an empty value
    counts as unset), else its default. With `secrets_as_env_vars` (resources), a secret is an
    `EnvVar` when it has no default or its variable is set: resolved in each process, and a run
    without it stops before its first step and names it."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        env = extra.get("env")
        if not env or name in overrides:
            continue
        is_set = environ.get(env) not in (None, "")
        if secrets_as_env_vars and extra.get("secret") and (is_set or field.is_required()):
            values[name] = dg.EnvVar(env)
        elif is_set:
            values[name] = environ[env]
    values.update(overrides)
    try:
        return model(**values)
    except ValidationError as exc:
        raise SettingError("; ".join(_problem(model, error) for error in exc.errors())) from None


def _problem(model: type[BaseModel], error: Mapping[str, Any]) -> str:
    field = model.model_fields.get(str(error["loc"][0])) if error["loc"] else None
    extra = field.json_schema_extra if field is not None and isinstance(field.json_schema_extra, dict) else {}
    shown = "(secret)" if extra.get("secret") else repr(error.get("input"))
    return f"{extra.get('env') or error['loc']} = {shown}: {error['msg']}"


def secret_variables(*models: type[BaseModel]) -> list[str]:
    """The environment variables of the secret settings of `models`."""
    return [field.json_schema_extra["env"] for model in models for field in model.model_fields.values()
            if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("secret")]


AlertFormat = Literal["json", "dingtalk", "wecom", "feishu", "slack"]
ExecutorName = Literal["multiprocess", "in_process", "celery"]


class PipelineSettings(BaseModel):
    """The settings that are not a resource's."""

    # The sensors
    sensor_tick_seconds: int = env_field(
        "CALL_PIPELINE_SENSOR_TICK_SECONDS", 20, gt=0,
        description="How often the sensors look at the CRM and the job groups (seconds)")
    sensor_interval_seconds: int = env_field(
        "CALL_PIPELINE_SENSOR_INTERVAL_SECONDS", 300, gt=0,
        description="The window of a sensor run key: at most one run per task and window (seconds)")
    sensor_max_interval_seconds: int = env_field(
        "CALL_PIPELINE_SENSOR_MAX_INTERVAL_SECONDS", 3600, gt=0,
        description="A task whose group and CRM show no change still gets a run this often (seconds)")
    reconcile_days: int = env_field(
        "CALL_PIPELINE_RECONCILE_DAYS", 7, ge=0,
        description="Tasks concluded (at 4) within this many days are checked for jobs that came late")
    state_schedule_cron: str = env_field(
        "CALL_PIPELINE_STATE_SCHEDULE_CRON", "*/10 * * * *",
        description="Cron of the schedule that advances every task's state")

    # Paging: ListJobsByGroup pages of 100 jobs; pages per mapped chain chosen by measurement
    # (README "Performance": each step process starts cold, so fewer, larger batches cost less
    # CPU; 20 against 10 took a third less CPU and kept the runs with latency as fast).
    page_size: int = env_field("CALL_PIPELINE_PAGE_SIZE", 100, ge=1, description="ListJobsByGroup page size")
    pages_per_batch: int = env_field(
        "CALL_PIPELINE_PAGES_PER_BATCH", 20, ge=1,
        description="Pages whose jobs one mapped chain (steps 2-5) works on together (the first batch: an "
                    "eighth of it, at least one page)")

    # Op retries, after the SDKs' own per-request retries. A first delay of 5 s waits 5, 15 and 35 s:
    # a fault that lasts fails the run in about two minutes (with the SDKs' retries; README
    # "What happens when things fail"), one of seconds is absorbed.
    op_max_retries: int = env_field("CALL_PIPELINE_OP_MAX_RETRIES", 3, ge=0,
                                    description="Retries of an op that calls a cloud")
    op_retry_delay_seconds: int = env_field("CALL_PIPELINE_OP_RETRY_DELAY_SECONDS", 5, ge=0,
                                            description="The first op retry's delay (seconds), doubling")

    # A unit of one lead (its call result, recording or follow-up) that failed in this many runs is
    # given up (contract §12), so that one poison lead does not hold its task forever.
    max_unit_attempts: int = env_field("CALL_PIPELINE_MAX_UNIT_ATTEMPTS", 5, ge=1,
                                       description="Runs in which a unit of one lead may fail before it is "
                                                   "given up")

    # The executor of sync_call_task: multiprocess is the one measured fastest on one machine.
    executor: ExecutorName = env_field("CALL_PIPELINE_EXECUTOR", "multiprocess",
                                       description="multiprocess, in_process or celery")
    max_concurrent_steps: int = env_field("CALL_PIPELINE_MAX_CONCURRENT_STEPS", 6, ge=1,
                                          description="multiprocess: steps at once in one run")
    max_concurrent_steps_per_queue: int = env_field(
        "CALL_PIPELINE_MAX_CONCURRENT_STEPS_PER_QUEUE", 2, ge=1,
        description="multiprocess: of those, step-4 or step-5 steps at once (each kind keeps slots "
                    "while the other runs)")
    in_process_max_jobs: int = env_field(
        "CALL_PIPELINE_IN_PROCESS_MAX_JOBS", 300, ge=0,
        description="multiprocess: a run the sensor expects to carry at most this many jobs (not yet matched, "
                    "completed since the last run, or with work left) runs its steps in its own process")
    celery_broker: str = env_field("CALL_PIPELINE_CELERY_BROKER", "pyamqp://guest:guest@127.0.0.1:5672//",
                                   secret=True, description="celery: the broker")
    celery_backend: str = env_field("CALL_PIPELINE_CELERY_BACKEND", "redis://127.0.0.1:6379/0", secret=True,
                                    description="celery: the result backend")

    # The account's limits across machines
    redis_url: str | None = env_field(
        "CALL_PIPELINE_REDIS_URL", None, secret=True,
        description="Redis holding OUTBOUNDBOT_MAX_QPS and DASHSCOPE_MAX_CONCURRENCY for every machine; "
                    "unset: they hold per machine, in files under CALL_PIPELINE_STATE_DIR")
    redis_key_prefix: str = env_field("CALL_PIPELINE_REDIS_KEY_PREFIX", "call_pipeline",
                                      description="The start of every Redis key of the limits")
    # A process that dies holding LLM slots (SIGKILL, OOM, a lost machine) cannot give them back:
    # its leases run out instead. Renewed every third of it while held, so a live holder keeps its
    # slot through a pause of two thirds of it.
    redis_lease_seconds: float = env_field(
        "CALL_PIPELINE_REDIS_LEASE_SECONDS", 30, ge=1, le=300,
        description="How long the LLM slot of a process that died stays taken in Redis (seconds; "
                    "renewed every third while held)")
    state_dir: str | None = env_field(
        "CALL_PIPELINE_STATE_DIR", None,
        description="The per-machine limits' files; unset: under DAGSTER_HOME, else the temp folder")

    # Where steps hand each other their outputs
    io_store: str | None = env_field(
        "CALL_PIPELINE_IO_STORE", None,
        description="s3://bucket/prefix for workers that share no disk; unset: the instance's storage folder")
    io_s3_endpoint: str | None = env_field("CALL_PIPELINE_IO_S3_ENDPOINT", None,
                                           description="The S3-compatible endpoint of CALL_PIPELINE_IO_STORE")

    # A Succeeded call whose transcript has not come yet is read again for this long after the
    # call ended before its "no conversation" follow-up is written (SPEC §12).
    transcript_grace_seconds: int = env_field(
        "CALL_PIPELINE_TRANSCRIPT_GRACE_SECONDS", 300, ge=0,
        description="A Succeeded call without a transcript is read again until this long after it ended, "
                    "before its no-conversation follow-up is written (seconds; 0: at once)")

    # The operator's view
    alert_webhook_url: str | None = env_field("CALL_PIPELINE_ALERT_WEBHOOK_URL", None, secret=True,
                                              description="Where failure alerts go; unset: no alerts")
    alert_format: AlertFormat = env_field("CALL_PIPELINE_ALERT_FORMAT", "json",
                                          description="json, dingtalk, wecom, feishu or slack")
    hot_lead_webhook_url: str | None = env_field(
        "CALL_PIPELINE_HOT_LEAD_WEBHOOK_URL", None, secret=True,
        description="Where each lead the AI marks interested is posted once, in CALL_PIPELINE_ALERT_FORMAT; "
                    "unset: not posted")
    ui_base_url: str = env_field("CALL_PIPELINE_UI_BASE_URL", "http://127.0.0.1:3000",
                                 description="The Dagster UI's address, for the run links of alerts")
    stalled_group_seconds: int = env_field(
        "CALL_PIPELINE_STALLED_GROUP_SECONDS", 86400, gt=0,
        description="A task's job group Paused, Draft or Initializing for longer than this raises an alert, "
                    "at most once a day per task (seconds)")

    @field_validator("alert_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("ui_base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")


def settings_table(*models: type[BaseModel]) -> str:
    """Every setting of `models` as a Markdown table: variable, default, meaning."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for model in models:
        for field in model.model_fields.values():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            if not extra.get("env"):
                continue
            default = ("required" if field.is_required() else "unset" if field.default is None
                       else f"`{field.default}`")
            meaning = (field.description or "").removesuffix(f" ({extra['env']})")
            rows.append(f"| `{extra['env']}` | {default} | {meaning}{' (secret)' if extra.get('secret') else ''} |")
    return "\n".join(rows)


@functools.cache
def settings() -> PipelineSettings:
    """The pipeline's settings, read from the environment at the first call, not at import: a
    variable set after the package is imported (a test's fixture, a command's option) is seen
    as long as nothing asked for the settings before."""
    return from_env(PipelineSettings, secrets_as_env_vars=False)
