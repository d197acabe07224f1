"""Step outputs in an S3-compatible bucket, for steps on machines that share no disk (Celery
workers): dagster-aws's `S3PickleIOManager` with the re-execution rule of `io_managers.py`."""

from __future__ import annotations

import dagster as dg
from dagster_aws.s3 import S3PickleIOManager

from call_pipeline.io_managers import never_produced


class ReexecutionSafeS3PickleIOManager(S3PickleIOManager):
    """Inputs that no run of the lineage produced load as None (see call_pipeline/io_managers.py)."""

    def load_input(self, context: dg.InputContext):
        return None if never_produced(context) else super().load_input(context)
