"""Units of one lead that keep failing (contract §12): counted per run, given up after
`max_attempts` runs, in the pipeline's own table (crm/schema.py, `call_pipeline_unit_failures`).

A step hands its failed and succeeded leads to `UnitLedger.record` once, at its end: each failed
lead's unit is counted at most once per run (a retry of the step in the same run, or the batch
caught up again, does not count twice: the count is keyed by the run id), a success clears the
count, and the lead rows given up now are returned for the step to conclude them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine

from call_pipeline.crm import repository as repo


@dataclass(frozen=True)
class UnitLedger:
    engine: Engine
    run_id: str
    max_attempts: int

    def held(self, task_id: int, unit: str) -> set[int]:
        """Lead rows of the task with a failure of `unit` counted and not given up."""
        with self.engine.connect() as conn:
            return repo.lead_rows_with_failures(conn, task_id, unit)

    def record(self, task_id: int, unit: str, failed: dict[int, str], succeeded: Iterable[int],
               now: datetime) -> list[int]:
        """Counts `failed` (lead row id → why) for this run and clears `succeeded`; returns the
        lead rows whose unit is given up now. Writes nothing when nothing failed or was held (a
        run with nothing wrong costs one read)."""
        succeeded = set(succeeded)
        cleared = self.held(task_id, unit) & succeeded if succeeded else set()
        if not failed and not cleared:
            return []
        with repo.write_transaction(self.engine) as conn:
            repo.clear_unit_failures(conn, task_id, unit, cleared)
            return repo.count_unit_failures(conn, task_id, unit, failed, self.run_id, self.max_attempts, now)
