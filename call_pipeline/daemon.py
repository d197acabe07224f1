"""`python -m call_pipeline.daemon run -w WORKSPACE`: Dagster's daemon (`dagster-daemon run`, the
same command line), which asks its code server for the server's id once a minute instead of every
second.

Dagster's workspace watches each code server it reaches over gRPC by asking for the server's id
every second (`dagster._grpc.server_watcher.WATCH_INTERVAL`), so that a UI sees a restarted or
reloaded server at once. The daemon makes no use of what that finds: it loads its whole workspace
again every minute anyway (`dagster._daemon.controller.RELOAD_WORKSPACE_INTERVAL`), which is how a
"Reload" from the UI reaches it. The asking cost about 0.6 s of CPU a minute between the daemon
and its code server on a machine that only watches (README, "Runs on one machine"). Dagster has no
setting for it: the module's constant is set here, before the daemon starts its watch; the
webserver keeps Dagster's.
"""

from __future__ import annotations

# As often as the daemon loads its workspace again, which is what picks up a changed server.
WATCH_INTERVAL_S = 60


def watch_code_servers_less_often() -> None:
    """For the rest of this process, workspaces watch their code servers every WATCH_INTERVAL_S."""
    import dagster._grpc.server_watcher as server_watcher

    server_watcher.WATCH_INTERVAL = WATCH_INTERVAL_S


def main() -> None:
    from dagster._daemon.cli import main as dagster_daemon

    watch_code_servers_less_often()
    dagster_daemon()


if __name__ == "__main__":
    main()
