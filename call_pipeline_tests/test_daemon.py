"""call_pipeline/daemon.py: Dagster's daemon with its code server watched once a minute. The daemon
itself runs through it in every test of `serve` (test_serve.py, reliability/test_deployment.py)."""

from __future__ import annotations

import subprocess
import sys
import time

import dagster._grpc.server_watcher as server_watcher
from dagster._grpc.client import DagsterGrpcClient

from call_pipeline import daemon


class _CountingClient(DagsterGrpcClient):
    """A code server's gRPC client that answers the watch's question itself, and counts it."""

    def __init__(self) -> None:
        super().__init__(port=1, host="127.0.0.1")
        self.asked = 0

    def get_server_id(self, timeout: float | None = None) -> str:
        self.asked += 1
        return "server-1"


def _questions_in(seconds: float) -> int:
    client = _CountingClient()
    shutdown, thread = server_watcher.create_grpc_watch_thread(
        "loc", client, get_location_entry=lambda name: None, refresh_code_location=lambda name: None,
        on_disconnect=lambda name: None, on_reconnected=lambda name: None, on_updated=lambda name, new_id: None,
        on_error=lambda name: None)
    thread.start()
    time.sleep(seconds)
    shutdown.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    return client.asked


def test_the_daemons_watch_asks_its_code_server_once_a_minute_not_every_second(monkeypatch):
    monkeypatch.setattr(server_watcher, "WATCH_INTERVAL", server_watcher.WATCH_INTERVAL)  # restored after
    assert _questions_in(2.5) >= 2  # Dagster's: every second
    daemon.watch_code_servers_less_often()
    assert server_watcher.WATCH_INTERVAL == daemon.WATCH_INTERVAL_S == 60
    assert _questions_in(2.5) == 1  # once on starting, then not within the minute


def test_the_module_is_dagsters_daemon_command():
    help_text = subprocess.run([sys.executable, "-m", "call_pipeline.daemon", "run", "--help"], capture_output=True,
                               text=True, timeout=120, check=True).stdout
    assert "Run any daemons configured on the DagsterInstance" in help_text
    assert "--workspace" in help_text
