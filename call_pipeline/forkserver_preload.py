"""Imported once by the forkserver of the multiprocess executor (`executors.PRELOADED_MODULES`),
and by that of the embedded default's run launcher (`instance.PreloadedRunLauncher`), so that the
step and run processes they fork start with the modules they need already imported.

Each step process builds its own `DagsterInstance` from the run's instance reference, and that
imports the instance's storage classes and what they pull in (alembic, the daemon's event
consumers, upath): 0.7 s of every step's start, measured, against 0.14 s once imported. Which
storage the instance uses (SQLite for the demo, MySQL in production) is read from DAGSTER_HOME's
dagster.yaml, the instance the run's processes share; without one, Dagster's defaults.

It also builds the SSL context the CRM's MySQL connections share (`crm/database.py`: 50-65 ms of
CPU, measured, once per step process otherwise).

Nothing here may raise: the forkserver treats only an ImportError of a preloaded module as
harmless, and any other error would stop every step of the run from starting.
"""

from __future__ import annotations

import importlib
import logging
import os

# Imported by every instance whatever its storage, or lazily on first use by a step. Opening an
# instance imports the last four lazily (Dagster's per-project state store under the home, its
# migration checks; `upath.core` brings fsspec): a forked run process opened its instance in
# 105 ms of CPU, 45 ms with them preloaded.
_ALWAYS = (
    "dagster._core.storage.runs",
    "dagster._core.storage.event_log",
    "dagster._core.storage.schedules",
    "dagster._core.storage.root",
    "dagster._core.storage.local_compute_log_manager",
    "dagster._core.run_coordinator",
    "dagster._core.scheduler",
    "dagster._core.storage.sqlite_storage",
    "dagster._daemon",
    "dagster._core.instance.factory",
    "dagster._core.storage.migration.utils",
    "upath.core",
    "upath.implementations.local",
)


def instance_storage_modules(home: str | None) -> list[str]:
    """The modules of the storage classes the instance at `home` is configured with."""
    if not home or not os.path.exists(os.path.join(home, "dagster.yaml")):
        return []
    from dagster._core.instance.ref import InstanceRef

    ref = InstanceRef.from_dir(home)
    data = [getattr(ref, field) for field in dir(ref) if field.endswith("_data")]
    return sorted({d.module_name for d in data if getattr(d, "module_name", None)})


def preload() -> list[str]:
    """Imports the modules; returns those that failed (logged, never raised)."""
    failed = []
    try:
        names = [*_ALWAYS, *instance_storage_modules(os.environ.get("DAGSTER_HOME"))]
    except Exception as exc:  # a broken dagster.yaml: the step processes will say so themselves
        logging.getLogger(__name__).warning("forkserver preload: cannot read the instance: %s", exc)
        names = list(_ALWAYS)
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:
            failed.append(name)
            logging.getLogger(__name__).warning("forkserver preload: cannot import %s: %s", name, exc)
    try:
        from call_pipeline.crm.database import preferred_ssl_context

        preferred_ssl_context()
    except Exception as exc:  # the step processes build their own
        logging.getLogger(__name__).warning("forkserver preload: no shared SSL context: %s", exc)
    return failed


preload()
