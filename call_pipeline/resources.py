"""Dagster resources: the CRM database and the two cloud APIs, configured from the environment
variables of SPEC §6. Secrets come in through `EnvVar`, so they are resolved inside each process
and never stored in run config, tags or logs."""

from __future__ import annotations

import os
import threading
from datetime import datetime
from urllib.parse import urlparse
from zoneinfo import ZoneInfo

import dagster as dg
from dagster_aws.s3 import S3Resource
from pydantic import Field
from sqlalchemy import Engine

from call_pipeline import settings
from call_pipeline.clients.dashscope_llm import LlmClient, LlmSettings
from call_pipeline.clients.limits import concurrency_limit, rate_limiter
from call_pipeline.clients.outboundbot import OutboundBotClient, OutboundBotSettings
from call_pipeline.clients.recording_store import RecordingArchive, open_store
from call_pipeline.crm.database import DEFAULT_CRM_URL, get_crm_engine
from call_pipeline.io_managers import ReexecutionSafeFilesystemIOManager, ReexecutionSafeS3PickleIOManager

DEFAULT_OUTBOUNDBOT_ENDPOINT = "outboundbot.cn-shanghai.aliyuncs.com"
DEFAULT_TIMEZONE = "Asia/Shanghai"

_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def _cached(key: tuple, factory):
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = factory()
        return client


class CrmDatabase(dg.ConfigurableResource):
    """The CRM's database (SQLAlchemy URL). The engine and its pool are shared per process."""

    url: str = Field(description="SQLAlchemy URL of the CRM database (CALL_PIPELINE_CRM_URL).")
    timezone: str = Field(default=DEFAULT_TIMEZONE, description="The CRM's time zone (CALL_PIPELINE_TIMEZONE).")

    @property
    def engine(self) -> Engine:
        return get_crm_engine(self.url)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def now(self) -> datetime:
        """Now, naive, in the CRM's zone: how the CRM stores datetimes."""
        return datetime.now(self.zone).replace(tzinfo=None, microsecond=0)


class OutboundBotResource(dg.ConfigurableResource):
    access_key_id: str
    access_key_secret: str
    instance_id: str
    endpoint: str = DEFAULT_OUTBOUNDBOT_ENDPOINT
    protocol: str = "https"
    max_qps: float = Field(
        default=20.0, description="Requests per second across every op and run (OUTBOUNDBOT_MAX_QPS)."
    )
    connect_timeout_ms: int = 5000
    read_timeout_ms: int = 10000
    max_attempts: int = 3

    def get_client(self) -> OutboundBotClient:
        settings = OutboundBotSettings(
            access_key_id=self.access_key_id,
            access_key_secret=self.access_key_secret,
            instance_id=self.instance_id,
            endpoint=self.endpoint,
            protocol=self.protocol,
            max_qps=self.max_qps,
            connect_timeout_ms=self.connect_timeout_ms,
            read_timeout_ms=self.read_timeout_ms,
            max_attempts=self.max_attempts,
        )

        def build() -> OutboundBotClient:
            limiter = rate_limiter(f"outboundbot-{self.endpoint}-{self.instance_id}", self.max_qps)
            return OutboundBotClient(settings, limiter)

        return _cached(("outboundbot", settings), build)


class DashScopeResource(dg.ConfigurableResource):
    api_key: str
    model: str = "qwen-plus"
    app_id: str | None = Field(
        default=None, description="A Bailian app id; wins over the model when set (BAILIAN_APP_ID)."
    )
    base_http_api_url: str | None = Field(
        default=None, description="DASHSCOPE_HTTP_BASE_URL; the SDK's default when unset."
    )
    max_concurrency: int = Field(
        default=8, description="LLM calls in flight across every op and run (DASHSCOPE_MAX_CONCURRENCY)."
    )
    request_timeout_s: float = 60.0
    max_attempts: int = 3

    def get_client(self) -> LlmClient:
        settings = LlmSettings(
            api_key=self.api_key,
            model=self.model,
            app_id=self.app_id or None,
            base_http_api_url=self.base_http_api_url or None,
            max_concurrency=self.max_concurrency,
            request_timeout_s=self.request_timeout_s,
            max_attempts=self.max_attempts,
        )

        def build() -> LlmClient:
            target = self.base_http_api_url or "default"
            return LlmClient(settings, concurrency_limit(f"dashscope-{target}", self.max_concurrency))

        return _cached(("dashscope", settings), build)


class RecordingArchiveResource(dg.ConfigurableResource):
    """Where step 4 archives recordings (CALL_PIPELINE_RECORDING_STORE); none: the CRM keeps the
    signed URL. The S3 credentials are boto3's own (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)."""

    store_url: str | None = Field(default=None, description="file:///path or s3://bucket/prefix")
    s3_endpoint: str | None = Field(default=None, description="CALL_PIPELINE_RECORDING_S3_ENDPOINT")
    public_base_url: str | None = Field(default=None, description="CALL_PIPELINE_RECORDING_PUBLIC_BASE_URL")
    max_bytes: int = Field(default=64 * 1024 * 1024, description="CALL_PIPELINE_RECORDING_MAX_BYTES")
    max_concurrency: int = Field(default=8, description="CALL_PIPELINE_RECORDING_MAX_CONCURRENCY")

    def get_archive(self) -> RecordingArchive | None:
        if not self.store_url:
            return None

        def build() -> RecordingArchive:
            return RecordingArchive(open_store(self.store_url, self.s3_endpoint), self.public_base_url,
                                    self.max_bytes,
                                    limit=concurrency_limit(f"recordings-{self.store_url}", self.max_concurrency))

        return _cached(("recordings", self.store_url, self.s3_endpoint, self.public_base_url, self.max_bytes,
                        self.max_concurrency), build)


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _env_number(name: str, default: str, kind: type) -> float | int:
    raw = _env(name, default)
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {raw!r}")
    return value


def io_manager_from_settings() -> dg.ConfigurableIOManagerFactory | dg.ConfigurableIOManager:
    """Step outputs in the instance's storage folder, or in CALL_PIPELINE_IO_STORE (s3://...)."""
    if not settings.IO_STORE:
        return ReexecutionSafeFilesystemIOManager()
    parsed = urlparse(settings.IO_STORE)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"CALL_PIPELINE_IO_STORE must be s3://bucket/prefix, got {settings.IO_STORE!r}")
    return ReexecutionSafeS3PickleIOManager(
        s3_resource=S3Resource(endpoint_url=settings.IO_S3_ENDPOINT), s3_bucket=parsed.netloc,
        s3_prefix=parsed.path.strip("/") or "dagster")


def resources_from_env() -> dict[str, dg.ConfigurableResource | dg.ConfigurableIOManagerFactory]:
    """The resources as SPEC §6 configures them. Credentials are `EnvVar`s: a run without them
    fails before its first step with Dagster's error naming every missing variable; it never
    falls back to the simulator. The IO manager: Dagster's filesystem one, safe for re-execution
    from failure after a killed run (call_pipeline/io_managers.py)."""
    crm_url = dg.EnvVar("CALL_PIPELINE_CRM_URL") if _env("CALL_PIPELINE_CRM_URL") else DEFAULT_CRM_URL
    return {
        "io_manager": io_manager_from_settings(),
        "crm": CrmDatabase(url=crm_url, timezone=_env("CALL_PIPELINE_TIMEZONE", DEFAULT_TIMEZONE)),
        "outboundbot": OutboundBotResource(
            access_key_id=dg.EnvVar("ALIBABA_CLOUD_ACCESS_KEY_ID"),
            access_key_secret=dg.EnvVar("ALIBABA_CLOUD_ACCESS_KEY_SECRET"),
            instance_id=dg.EnvVar("OUTBOUNDBOT_INSTANCE_ID"),
            endpoint=_env("OUTBOUNDBOT_ENDPOINT", DEFAULT_OUTBOUNDBOT_ENDPOINT),
            protocol=_env("OUTBOUNDBOT_PROTOCOL", "https"),
            max_qps=_env_number("OUTBOUNDBOT_MAX_QPS", "20", float),
        ),
        "recording_archive": RecordingArchiveResource(
            store_url=settings.RECORDING_STORE, s3_endpoint=settings.RECORDING_S3_ENDPOINT,
            public_base_url=settings.RECORDING_PUBLIC_BASE_URL, max_bytes=settings.RECORDING_MAX_BYTES,
            max_concurrency=settings.RECORDING_MAX_CONCURRENCY,
        ),
        "dashscope": DashScopeResource(
            api_key=dg.EnvVar("DASHSCOPE_API_KEY"),
            model=_env("DASHSCOPE_MODEL", "qwen-plus"),
            app_id=_env("BAILIAN_APP_ID"),
            base_http_api_url=_env("DASHSCOPE_HTTP_BASE_URL"),
            max_concurrency=_env_number("DASHSCOPE_MAX_CONCURRENCY", "8", int),
        ),
    }
