"""A target for a forked process that imports only the standard library (test_forkserver_preload)."""

import sys


def imported(queue, modules: list[str]) -> None:
    queue.put([name in sys.modules for name in modules])


def ssl_context_built(queue) -> None:
    database = sys.modules.get("call_pipeline.crm.database")
    queue.put(database is not None and database.preferred_ssl_context.cache_info().currsize == 1)


def storage_imported(queue) -> None:
    imported(queue, ["dagster._core.storage.sqlite_storage", "dagster._daemon", "upath.core"])


def modules_imported_opening_the_instance(queue) -> None:
    """The modules a forked child imports to open DAGSTER_HOME's instance, as a run process does."""
    import os

    from dagster import DagsterInstance
    from dagster._core.instance.ref import InstanceRef

    before = set(sys.modules)
    with DagsterInstance.from_ref(InstanceRef.from_dir(os.environ["DAGSTER_HOME"])):
        pass
    queue.put(sorted(name for name in set(sys.modules) - before if not name.startswith("call_pipeline_tests")))
