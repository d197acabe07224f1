"""Each setting is declared once, with its variable; reading the environment is one function."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

import call_pipeline.definitions  # noqa: F401  (as any test module does: the definitions read the settings)
from call_pipeline.clients.limits import default_state_dir
from call_pipeline.crm.database import PROJECT_ROOT
from call_pipeline.resources import RESOURCE_SETTINGS, DashScopeResource, OutboundBotResource, RecordingArchiveResource
from call_pipeline.settings import (
    PipelineSettings,
    SettingError,
    env_name,
    from_env,
    secret_variables,
    settings,
    settings_table,
)


def test_unset_and_empty_variables_take_the_declared_defaults():
    settings = from_env(PipelineSettings, {"CALL_PIPELINE_PAGE_SIZE": ""}, secrets_as_env_vars=False)
    assert settings.page_size == PipelineSettings.model_fields["page_size"].default == 100
    assert settings.executor == "multiprocess" and settings.redis_url is None


def test_values_are_parsed_and_normalised():
    settings = from_env(PipelineSettings, {
        "CALL_PIPELINE_SENSOR_TICK_SECONDS": "5", "CALL_PIPELINE_ALERT_FORMAT": "DingTalk",
        "CALL_PIPELINE_UI_BASE_URL": "http://ui.internal:3000/",
    }, secrets_as_env_vars=False)
    assert settings.sensor_tick_seconds == 5 and settings.alert_format == "dingtalk"
    assert settings.ui_base_url == "http://ui.internal:3000"


def test_a_bad_value_names_every_variable_and_what_it_must_be():
    with pytest.raises(SettingError) as error:
        from_env(PipelineSettings, {"CALL_PIPELINE_EXECUTOR": "threads", "CALL_PIPELINE_PAGE_SIZE": "0",
                                    "CALL_PIPELINE_OP_MAX_RETRIES": "three"}, secrets_as_env_vars=False)
    message = str(error.value)
    assert "CALL_PIPELINE_EXECUTOR = 'threads'" in message and "'in_process'" in message
    assert "CALL_PIPELINE_PAGE_SIZE = '0'" in message and "greater than or equal to 1" in message
    assert "CALL_PIPELINE_OP_MAX_RETRIES = 'three'" in message


def test_a_bad_secret_is_named_without_its_value():
    with pytest.raises(SettingError) as error:
        from_env(OutboundBotResource, {"OUTBOUNDBOT_PROTOCOL": "ftp"}, access_key_id="ak", access_key_secret="sk",
                 instance_id="i", max_qps="-1")
    assert "OUTBOUNDBOT_PROTOCOL = 'ftp'" in str(error.value) and "OUTBOUNDBOT_MAX_QPS" in str(error.value)
    broker = "pyamqp://app:hunter2@mq.internal//"
    settings = from_env(PipelineSettings, {"CALL_PIPELINE_CELERY_BROKER": broker}, secrets_as_env_vars=False)
    assert settings.celery_broker == broker and "hunter2" not in repr(settings)


def test_resources_take_secrets_as_env_vars_and_the_rest_as_values():
    environ = {"ALIBABA_CLOUD_ACCESS_KEY_ID": "ak", "OUTBOUNDBOT_ENDPOINT": "127.0.0.1:9", "OUTBOUNDBOT_MAX_QPS": "7.5"}
    resource = from_env(OutboundBotResource, environ)
    assert isinstance(resource.access_key_id, dg.EnvVar) and resource.access_key_id.env_var_name == \
        "ALIBABA_CLOUD_ACCESS_KEY_ID"
    # a required secret is an EnvVar even when unset: the run names it when it starts
    assert isinstance(resource.access_key_secret, dg.EnvVar)
    assert resource.endpoint == "127.0.0.1:9" and resource.max_qps == 7.5
    dashscope = from_env(DashScopeResource, {"DASHSCOPE_MAX_CONCURRENCY": "16", "BAILIAN_APP_ID": "app-1"})
    assert dashscope.max_concurrency == 16 and dashscope.app_id == "app-1" and dashscope.model == "qwen-plus"
    assert from_env(RecordingArchiveResource, {}).store_url is None


def test_each_variable_has_one_setting():
    names = [env_name(model, field) for model in (PipelineSettings, *RESOURCE_SETTINGS)
             for field, info in model.model_fields.items() if isinstance(info.json_schema_extra, dict)]
    assert len(names) == len(set(names))
    assert {"CALL_PIPELINE_CRM_URL", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "DASHSCOPE_API_KEY",
            "CALL_PIPELINE_CELERY_BROKER"} <= set(secret_variables(PipelineSettings, *RESOURCE_SETTINGS))
    assert "OUTBOUNDBOT_MAX_QPS" not in secret_variables(*RESOURCE_SETTINGS)


def _table_rows(markdown: str) -> dict[str, list[str]]:
    """The rows of a settings table, by variable: [variable, default, meaning]."""
    return {cells[0]: cells for cells in ([cell.strip() for cell in line.strip().strip("|").split(" | ")]
                                          for line in markdown.splitlines() if line.startswith("| `"))}


def test_the_readme_lists_every_setting():
    """README's table is `call-pipeline settings`' cell by cell: variable, default and meaning."""
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Settings"):]
    section = section[:section.index("\n## ", 5)]
    for model in (*RESOURCE_SETTINGS, PipelineSettings):
        for field, info in model.model_fields.items():
            if isinstance(info.json_schema_extra, dict):
                assert f"| `{env_name(model, field)}` |" in section, env_name(model, field)
    in_readme, in_code = _table_rows(section), _table_rows(settings_table(*RESOURCE_SETTINGS, PipelineSettings))
    assert list(in_readme) == list(in_code)
    for variable, cells in in_code.items():
        assert in_readme[variable] == cells, variable


def test_the_test_session_keeps_its_limiter_files_in_its_own_folder(tmp_path_factory):
    """conftest sets CALL_PIPELINE_STATE_DIR after the definitions were imported (and read the
    settings); the limiters still use it."""
    state_dir = Path(os.environ["CALL_PIPELINE_STATE_DIR"])
    assert tmp_path_factory.getbasetemp() in state_dir.parents
    assert settings().state_dir == str(state_dir)
    assert default_state_dir() == state_dir


_AFTER_IMPORT = """
import os, sys
import call_pipeline, call_pipeline.settings, call_pipeline.clients.limits
assert call_pipeline.settings.settings.cache_info().currsize == 0, "importing the package read the settings"
os.environ["CALL_PIPELINE_STATE_DIR"] = sys.argv[1]
print(call_pipeline.clients.limits.default_state_dir())
"""


def test_a_state_dir_set_after_the_package_is_imported_takes_effect(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "CALL_PIPELINE_STATE_DIR"}
    done = subprocess.run([sys.executable, "-c", _AFTER_IMPORT, str(tmp_path)], env=env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path)


def test_cache_clear_reads_the_environment_again(tmp_path, monkeypatch):
    monkeypatch.setenv("CALL_PIPELINE_STATE_DIR", str(tmp_path))
    settings.cache_clear()
    try:
        assert default_state_dir() == tmp_path
    finally:
        monkeypatch.undo()
        settings.cache_clear()
    assert default_state_dir() != tmp_path
