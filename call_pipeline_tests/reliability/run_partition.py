"""A run of one partition in its own process, as the run launcher would start it:
`python -m call_pipeline_tests.reliability.run_partition TASK_ID [--page-size N] [--from-failure RUN_ID]
[--executor NAME]`.
The instance is DAGSTER_HOME's; the last line printed is `{"run_id": ..., "success": ...}`."""

from __future__ import annotations

import argparse
import json
import sys

import dagster as dg

from call_pipeline_tests.reliability.harness import launch_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("task_id", type=int)
    parser.add_argument("--page-size", type=int, default=20)
    parser.add_argument("--from-failure", default=None)
    parser.add_argument("--executor", default=None, help="default: the job's own")
    args = parser.parse_args(argv)
    with dg.DagsterInstance.get() as instance:
        result = launch_run(instance, args.task_id, page_size=args.page_size, from_failure_of=args.from_failure,
                            executor=args.executor)
        print(json.dumps({"run_id": result.run_id, "success": result.success}), flush=True)
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
