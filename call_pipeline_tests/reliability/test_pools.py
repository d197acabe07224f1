"""A new instance gets the ops' pools before its first run (`serve`, `create_pools`): the first runs
of a new MySQL instance claimed their pools at once and raced on creating them."""

from __future__ import annotations

import shutil

import pytest
import yaml
from dagster import DagsterInstance
from dagster._core.instance.ref import InstanceRef

from call_pipeline.crm.database import PROJECT_ROOT
from call_pipeline.queues import STEP_QUEUES
from call_pipeline.serve import open_instance_storage

INSTANCE_FILES = {"one machine (SQLite)": PROJECT_ROOT / "dagster.yaml",
                  "production (MariaDB)": PROJECT_ROOT / "deploy" / "dagster.yaml"}


@pytest.mark.parametrize("instance_file", list(INSTANCE_FILES))
def test_a_new_instance_has_every_pool_at_its_default_limit_before_any_run(instance_file, tmp_path, request,
                                                                            monkeypatch):
    if instance_file.startswith("production"):
        for name, value in request.getfixturevalue("dagster_mysql_env").items():
            monkeypatch.setenv(name, value)
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(INSTANCE_FILES[instance_file], home / "dagster.yaml")
    open_instance_storage(home)
    with DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        default_limit = instance.global_op_concurrency_default_limit
        assert default_limit == yaml.safe_load(INSTANCE_FILES[instance_file].read_text())["concurrency"]["pools"][
            "default_limit"]
        assert set(instance.event_log_storage.get_concurrency_keys()) == set(STEP_QUEUES)
        for pool in STEP_QUEUES:
            info = instance.event_log_storage.get_concurrency_info(pool)
            assert (info.slot_count, info.active_slot_count, info.using_default_limit) == (default_limit, 0, True), pool
        open_instance_storage(home)  # serve started again: nothing changes
        assert {pool: instance.event_log_storage.get_concurrency_info(pool).slot_count
                for pool in STEP_QUEUES} == dict.fromkeys(STEP_QUEUES, default_limit)
