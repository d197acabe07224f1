"""Step outputs in an S3-compatible bucket, for steps on machines that share no disk (Celery
workers): dagster-aws's `S3PickleIOManager` with the re-execution rule of `io_managers.py`, on an
S3 client made once per process."""

from __future__ import annotations

import functools
import os
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3PickleIOManager, S3Resource
from dagster_aws.s3.utils import construct_s3_client

from call_pipeline.io_managers import never_produced


class ReexecutionSafeS3PickleIOManager(S3PickleIOManager):
    """Inputs that no run of the lineage produced load as None (see call_pipeline/io_managers.py)."""

    def load_input(self, context: dg.InputContext):
        return None if never_produced(context) else super().load_input(context)


class ProcessS3Resource(S3Resource):
    """dagster-aws's `S3Resource`, whose client is made once per process and settings, not once per
    run: each new client starts a boto3 session that reads and parses botocore's endpoint and
    service files again, measured at about 15% of the CPU of a small run on a Celery run worker.
    boto3's clients are thread-safe; one made before a fork is not used after it (the pid is part
    of the key)."""

    def get_client(self) -> Any:
        return _client(os.getpid(), max_attempts=self.max_attempts, region_name=self.region_name,
                       endpoint_url=self.endpoint_url, use_unsigned_session=self.use_unsigned_session,
                       profile_name=self.profile_name, use_ssl=self.use_ssl, verify=self.verify,
                       aws_access_key_id=self.aws_access_key_id, aws_secret_access_key=self.aws_secret_access_key,
                       aws_session_token=self.aws_session_token)


@functools.cache
def _client(_pid: int, **settings: Any) -> Any:
    return construct_s3_client(**settings)
