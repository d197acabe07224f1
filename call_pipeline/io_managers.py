"""The IO manager of `sync_call_task`: Dagster's filesystem pickling, made safe for re-execution
from failure after the run's process died.

Dagster 1.13 re-executes from failure the failed and interrupted steps and what follows them.
When the parent run was killed while the first batch was being matched, the other batches'
`match_job_page` steps had never started: the re-execution leaves them out, yet schedules their
downstream mapped steps (`fetch_call_results[page_6]`, ...), whose input was then never produced
in any run of the lineage. Loading it raises "Attempting to access run_id, but it was not
provided" before the op runs, on every re-execution, so the partition could never be finished
from failure. Such an input loads as None here instead; the ops pass None along as "this batch
was not run", and the op after `.collect()` does those batches itself (steps/catch_up.py). Every
other input loads exactly as with Dagster's own IO manager. On Celery workers, which share no
disk, the step outputs go to an S3-compatible bucket instead (CALL_PIPELINE_IO_STORE), with the
same rule: `call_pipeline/s3_io_manager.py`, imported only then (dagster-aws takes 0.6 s to import,
in every process that loads the definitions).
"""

from __future__ import annotations

import dagster as dg
from dagster._core.errors import DagsterInvariantViolationError
from dagster._core.storage.fs_io_manager import PickledObjectFilesystemIOManager


def never_produced(context: dg.InputContext) -> bool:
    """Whether no run of the lineage produced this input (its step never ran); logged."""
    upstream = context.upstream_output
    if upstream is None:
        return False
    try:
        upstream.run_id  # noqa: B018 - raises when no run of the lineage produced the output
    except DagsterInvariantViolationError:
        context.log.warning(
            f"input {context.name!r} comes from step {upstream.step_key}, "
            "which no run of this lineage executed (the parent run was interrupted before it "
            "started); loading None: the re-execution catches up on that batch's work"
        )
        return True
    return False


class ReexecutionSafePickledIOManager(PickledObjectFilesystemIOManager):
    def load_input(self, context: dg.InputContext):
        return None if never_produced(context) else super().load_input(context)


class ReexecutionSafeFilesystemIOManager(dg.FilesystemIOManager):
    """`dg.FilesystemIOManager` (same `base_dir` setting, default: the instance's storage folder)
    whose inputs from steps that never ran in the lineage load as None (see the module)."""

    def create_io_manager(self, context: dg.InitResourceContext) -> ReexecutionSafePickledIOManager:
        base_dir = self.base_dir or context.instance.storage_directory()
        return ReexecutionSafePickledIOManager(base_dir=base_dir)
