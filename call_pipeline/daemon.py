"""`python -m call_pipeline.daemon run -w WORKSPACE`: Dagster's daemon (`dagster-daemon run`, the
same command line), with three changes to how it behaves, each Dagster's own code with one thing
set differently in this process only.

Dagster's workspace watches each code server it reaches over gRPC by asking for the server's id
every second (`dagster._grpc.server_watcher.WATCH_INTERVAL`), so that a UI sees a restarted or
reloaded server at once. The daemon makes no use of what that finds: it loads its whole workspace
again every minute anyway (`dagster._daemon.controller.RELOAD_WORKSPACE_INTERVAL`), which is how a
"Reload" from the UI reaches it. The asking cost about 0.6 s of CPU a minute between the daemon
and its code server on a machine that only watches (README, "Runs on one machine"). Dagster has no
setting for it: the module's constant is set here, before the daemon starts its watch; the
webserver keeps Dagster's.

Dagster records a run's failure in three writes: the RUN_FAILURE event, then the run's status,
then its `dagster/will_retry` tag (`handle_new_event`). The daemon's run-retry consumer reads the
new RUN_FAILURE events every few seconds, then the runs' records, and moves its cursor past the
events: a record read between the first write and the second says STARTED with no tag, Dagster's
`should_retry` answers no, and that run is never retried (seen in CI: the window is tens of
milliseconds, wider on a loaded machine). Here the consumer reads such a record again until it
says the run finished (`runs_as_recorded`, at most RECORD_WAIT_S).

Dagster's MySQL storage opens a connection for every query (`NullPool`), and the daemon queries all
the time: 100 runs queued at once spent 5.4 s of the daemon's 13.1 s of CPU connecting (a sampler
of per-thread CPU; mysql-connector does its handshake in Python). Here each storage keeps
`instance.KEPT_CONNECTIONS` (`instance.keep_connections`, through the project's instance class).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from dagster import DagsterInstance, DagsterRun

# As often as the daemon loads its workspace again, which is what picks up a changed server.
WATCH_INTERVAL_S = 60
# How long the retry consumer waits for the record of a run whose end event it read: Dagster
# writes it right after the event.
RECORD_WAIT_S = 10.0
RECORD_POLL_S = 0.05


def watch_code_servers_less_often() -> None:
    """For the rest of this process, workspaces watch their code servers every WATCH_INTERVAL_S."""
    import dagster._grpc.server_watcher as server_watcher

    server_watcher.WATCH_INTERVAL = WATCH_INTERVAL_S


def runs_as_recorded(runs: Sequence[DagsterRun], instance: DagsterInstance,
                     wait_s: float = RECORD_WAIT_S) -> list[DagsterRun]:
    """Each run as its record says once it says the run finished: read again while it does not,
    for at most `wait_s` in all (a run whose record never does is given as last read)."""
    deadline = time.monotonic() + wait_s
    recorded = []
    for run in runs:
        while not run.is_finished and time.monotonic() < deadline:
            time.sleep(RECORD_POLL_S)
            run = instance.get_run_by_id(run.run_id) or run
        recorded.append(run)
    return recorded


def retry_runs_whose_record_lags_their_failure() -> None:
    """For the rest of this process, Dagster's run-retry consumer decides on each run from its
    record once the record says the run finished (`runs_as_recorded`), not from a record that may
    not have caught up with the failure event it was handed for."""
    from dagster._daemon.auto_run_reexecution import auto_run_reexecution

    should_retry = auto_run_reexecution.should_retry

    def filter_runs_to_should_retry(runs: Sequence[DagsterRun], instance: DagsterInstance) -> Iterator[DagsterRun]:
        for run in runs_as_recorded(runs, instance):
            if should_retry(run, instance):
                yield run

    auto_run_reexecution.filter_runs_to_should_retry = filter_runs_to_should_retry


def main() -> None:
    from dagster._daemon.cli import main as dagster_daemon

    watch_code_servers_less_often()
    retry_runs_whose_record_lags_their_failure()
    from call_pipeline.instance import keep_connections_in_this_process

    keep_connections_in_this_process()
    dagster_daemon()


if __name__ == "__main__":
    main()
