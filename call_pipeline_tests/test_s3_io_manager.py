"""The step outputs' S3 client (`s3_io_manager.ProcessS3Resource`): one per process and settings,
against a real S3-compatible server."""

from __future__ import annotations

import os

from call_pipeline.s3_io_manager import ProcessS3Resource


def test_one_client_per_process_and_settings(s3, aws_test_credentials):
    client = ProcessS3Resource(endpoint_url=s3.endpoint).get_client()
    assert ProcessS3Resource(endpoint_url=s3.endpoint).get_client() is client  # the next run's
    assert ProcessS3Resource(endpoint_url=s3.endpoint, max_attempts=2).get_client() is not client
    bucket = s3.new_bucket()
    client.put_object(Bucket=bucket, Key="steps/out", Body=b"pickled")
    assert client.get_object(Bucket=bucket, Key="steps/out")["Body"].read() == b"pickled"

    # a process forked after the client was made makes its own
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            own = ProcessS3Resource(endpoint_url=s3.endpoint).get_client()
            ok = own is not client and own.get_object(Bucket=bucket, Key="steps/out")["Body"].read() == b"pickled"
            os.write(write_end, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        assert os.read(read_end, 1) == b"1"
    finally:
        os.close(read_end)
        os.waitpid(child, 0)
