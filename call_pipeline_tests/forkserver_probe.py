"""A target for a forked process that imports only the standard library (test_forkserver_preload)."""

import sys


def imported(queue, modules: list[str]) -> None:
    queue.put([name in sys.modules for name in modules])


def ssl_context_built(queue) -> None:
    database = sys.modules.get("call_pipeline.crm.database")
    queue.put(database is not None and database.preferred_ssl_context.cache_info().currsize == 1)


def storage_imported(queue) -> None:
    imported(queue, ["dagster._core.storage.sqlite_storage", "dagster._daemon", "upath"])
