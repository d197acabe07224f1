"""Dagster resources: the CRM database, the two cloud APIs and the recording archive. Their fields
are their settings, each with its environment variable (`call_pipeline.settings.env_field`)."""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Literal
from urllib.parse import urlparse
from zoneinfo import ZoneInfo

import dagster as dg
from pydantic import Field
from sqlalchemy import Engine

from call_pipeline.clients.dashscope_llm import DashScopeConfig, LlmClient
from call_pipeline.clients.limits import concurrency_limit, rate_limiter
from call_pipeline.clients.outboundbot import OutboundBotClient, OutboundBotConfig
from call_pipeline.clients.recording_store import RecordingArchive, open_store
from call_pipeline.crm.database import get_crm_engine
from call_pipeline.io_managers import ReexecutionSafeFilesystemIOManager
from call_pipeline.settings import PipelineSettings, env_field, from_env, secret_variables, settings

_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def _cached(resource: dg.ConfigurableResource, factory):
    """One client per process and configuration: its SDK sessions and limiters are shared by the
    threads of every op the process runs."""
    key = (type(resource).__name__, resource.model_dump_json())
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = factory()
        return client


class CrmDatabase(dg.ConfigurableResource):
    """The CRM's database. The engine and its pool are shared per process."""

    # Required, like the credentials: a run, sensor or schedule without it stops and names it
    # instead of reading an empty SQLite file in the checkout and finding nothing to do.
    url: str = env_field("CALL_PIPELINE_CRM_URL", secret=True, description="SQLAlchemy URL of the CRM database")
    timezone: str = env_field("CALL_PIPELINE_TIMEZONE", "Asia/Shanghai", description="The CRM's time zone")

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
    """Alibaba Cloud's Intelligent Outbound Bot; `get_client()` is its wrapper, shared per process."""

    access_key_id: str = env_field("ALIBABA_CLOUD_ACCESS_KEY_ID", secret=True, description="The AccessKey id")
    access_key_secret: str = env_field("ALIBABA_CLOUD_ACCESS_KEY_SECRET", secret=True,
                                       description="The AccessKey secret")
    instance_id: str = env_field("OUTBOUNDBOT_INSTANCE_ID", secret=True, description="The OutboundBot instance")
    endpoint: str = env_field("OUTBOUNDBOT_ENDPOINT", "outboundbot.cn-shanghai.aliyuncs.com",
                              description="host[:port]")
    protocol: Literal["https", "http"] = env_field("OUTBOUNDBOT_PROTOCOL", "https",
                                                   description="https, or http for the local simulator")
    max_qps: float = env_field("OUTBOUNDBOT_MAX_QPS", 20.0, gt=0,
                               description="Requests per second across every op and run of the account")
    connect_timeout_ms: int = Field(default=5000, gt=0)
    read_timeout_ms: int = Field(default=10000, gt=0)
    # The SDK's own retries of one request: attempts, and its exponential backoff with jitter
    # (README "What happens when things fail": 0.5 s doubling to 8 s, or the server's retry-after).
    max_attempts: int = Field(default=3, ge=1)
    backoff_ms: int = env_field("OUTBOUNDBOT_BACKOFF_MS", 500, ge=0,
                                description="The SDK's first retry delay of a request (milliseconds), doubling, "
                                            "with jitter")
    max_backoff_ms: int = env_field("OUTBOUNDBOT_MAX_BACKOFF_MS", 8000, ge=0,
                                    description="The longest retry delay of the SDK (milliseconds)")

    def client_config(self) -> OutboundBotConfig:
        return OutboundBotConfig(
            access_key_id=self.access_key_id, access_key_secret=self.access_key_secret, instance_id=self.instance_id,
            endpoint=self.endpoint, protocol=self.protocol, connect_timeout_ms=self.connect_timeout_ms,
            read_timeout_ms=self.read_timeout_ms, max_attempts=self.max_attempts, backoff_ms=self.backoff_ms,
            max_backoff_ms=self.max_backoff_ms)

    def get_client(self) -> OutboundBotClient:
        def build() -> OutboundBotClient:
            limiter = rate_limiter(f"outboundbot-{self.endpoint}-{self.instance_id}", self.max_qps)
            return OutboundBotClient(self.client_config(), limiter)

        return _cached(self, build)


class DashScopeResource(dg.ConfigurableResource):
    """Alibaba Bailian / DashScope; `get_client()` is its wrapper, shared per process."""

    api_key: str = env_field("DASHSCOPE_API_KEY", secret=True, description="The DashScope key")
    model: str = env_field("DASHSCOPE_MODEL", "qwen-plus", description="The model of Generation.call")
    app_id: str | None = env_field("BAILIAN_APP_ID", None,
                                   description="A Bailian app for Application.call; wins over the model")
    base_http_api_url: str | None = env_field("DASHSCOPE_HTTP_BASE_URL", None,
                                              description="The API's base URL; unset: the SDK's default")
    max_concurrency: int = env_field("DASHSCOPE_MAX_CONCURRENCY", 8, gt=0,
                                     description="LLM calls in flight across every op and run of the account")
    request_timeout_s: float = Field(default=60.0, gt=0)
    # Attempts of one call, and the backoff between them (DashScope returns errors, the wrapper retries).
    max_attempts: int = Field(default=3, ge=1)
    backoff_s: float = env_field("DASHSCOPE_BACKOFF_S", 1.0, ge=0,
                                 description="The first retry delay of an LLM call (seconds), doubling, with jitter")
    max_backoff_s: float = env_field("DASHSCOPE_MAX_BACKOFF_S", 20.0, ge=0,
                                     description="The longest retry delay of an LLM call (seconds)")

    def client_config(self) -> DashScopeConfig:
        return DashScopeConfig(
            api_key=self.api_key, model=self.model, app_id=self.app_id, base_http_api_url=self.base_http_api_url,
            max_concurrency=self.max_concurrency, request_timeout_s=self.request_timeout_s,
            max_attempts=self.max_attempts, backoff_s=self.backoff_s, max_backoff_s=self.max_backoff_s)

    def get_client(self) -> LlmClient:
        def build() -> LlmClient:
            target = self.base_http_api_url or "default"
            return LlmClient(self.client_config(), concurrency_limit(f"dashscope-{target}", self.max_concurrency))

        return _cached(self, build)


class RecordingArchiveResource(dg.ConfigurableResource):
    """Where step 4 archives recordings; unset: the CRM keeps the signed URL DownloadRecording
    gives, which expires. S3 credentials are boto3's own (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)."""

    store_url: str | None = env_field("CALL_PIPELINE_RECORDING_STORE", None,
                                      description="file:///path or s3://bucket/prefix")
    s3_endpoint: str | None = env_field("CALL_PIPELINE_RECORDING_S3_ENDPOINT", None,
                                        description="The S3-compatible endpoint (OSS, MinIO)")
    public_base_url: str | None = env_field(
        "CALL_PIPELINE_RECORDING_PUBLIC_BASE_URL", None,
        description="What recording_url starts with; unset: the store URL of the object")
    max_bytes: int = env_field("CALL_PIPELINE_RECORDING_MAX_BYTES", 64 * 1024 * 1024, gt=0,
                               description="The largest recording archived")
    max_concurrency: int = env_field("CALL_PIPELINE_RECORDING_MAX_CONCURRENCY", 8, gt=0,
                                     description="Recordings fetched at once, across every step and run "
                                                 "of the machine")

    def get_archive(self) -> RecordingArchive | None:
        if not self.store_url:
            return None

        def build() -> RecordingArchive:
            return RecordingArchive(open_store(self.store_url, self.s3_endpoint), self.public_base_url,
                                    self.max_bytes,
                                    limit=concurrency_limit(f"recordings-{self.store_url}", self.max_concurrency))

        return _cached(self, build)


RESOURCE_SETTINGS = (CrmDatabase, OutboundBotResource, DashScopeResource, RecordingArchiveResource)
# What an alert must never show: every secret setting's value, and boto3's own secret key.
SECRET_VARIABLES = (*secret_variables(PipelineSettings, *RESOURCE_SETTINGS), "AWS_SECRET_ACCESS_KEY")


def io_manager_from_settings() -> dg.ConfigurableIOManagerFactory | dg.ConfigurableIOManager:
    """Step outputs in the instance's storage folder, or in CALL_PIPELINE_IO_STORE (s3://...)."""
    if not settings().io_store:
        return ReexecutionSafeFilesystemIOManager()
    parsed = urlparse(settings().io_store)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"CALL_PIPELINE_IO_STORE must be s3://bucket/prefix, got {settings().io_store!r}")
    from call_pipeline.s3_io_manager import ProcessS3Resource, ReexecutionSafeS3PickleIOManager

    return ReexecutionSafeS3PickleIOManager(
        s3_resource=ProcessS3Resource(endpoint_url=settings().io_s3_endpoint), s3_bucket=parsed.netloc,
        s3_prefix=parsed.path.strip("/") or "dagster")


def resources_from_env() -> dict[str, dg.ConfigurableResource | dg.ConfigurableIOManagerFactory]:
    """The resources, from the environment. Credentials are `EnvVar`s: a run without them fails
    before its first step with Dagster's error naming every missing variable; nothing falls back
    to the simulator. Step outputs: see `io_manager_from_settings`."""
    return {
        "io_manager": io_manager_from_settings(),
        "crm": from_env(CrmDatabase),
        "outboundbot": from_env(OutboundBotResource),
        "recording_archive": from_env(RecordingArchiveResource),
        "dashscope": from_env(DashScopeResource),
    }
