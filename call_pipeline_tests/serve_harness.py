"""`call-pipeline serve` / `ui` as a real process for the tests: started in a folder of its own,
its whole process tree recorded with psutil, readiness read from the instance it runs with."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def alive(proc: psutil.Process) -> bool:
    """Running, and not a zombie (a container's init may never reap an orphan)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return f"{proc.pid}: {' '.join(proc.cmdline())[:160]}"
    return str(proc.pid)


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)


class Served:
    """One `call-pipeline serve`/`ui` process; `home` is the DAGSTER_HOME it runs with."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str], cwd: Path, home: Path,
                 ignore_sigint: bool = False) -> None:
        self.command, self.env, self.cwd, self.home = list(command), dict(env), cwd, home
        self.log_path = cwd / "serve.log"
        self.ignore_sigint = ignore_sigint
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Served:
        # As a shell starts it in the background with `&` (SIGINT ignored), when asked.
        preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if self.ignore_sigint else None
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, env=self.env, cwd=self.cwd, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, preexec_fn=preexec)
        return self

    def __exit__(self, *_exc: Any) -> None:
        # Whatever a failed test left behind: never a process running on after the test.
        left = self.family()
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(left, timeout=10)
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.log()[-4000:]}")
        return True

    def family(self) -> list[psutil.Process]:
        """serve, everything below it, and any process running with its DAGSTER_HOME (one that
        left the tree)."""
        found: dict[int, psutil.Process] = {}
        if self.process is not None:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(self.process.pid)
                found[root.pid] = root
                found.update({child.pid: child for child in root.children(recursive=True)})
        home = str(self.home)
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.environ().get("DAGSTER_HOME") == home:
                    found[proc.pid] = proc
        return [proc for proc in found.values() if alive(proc)]

    def cmdlines(self) -> list[str]:
        lines = []
        for proc in self.family():
            with contextlib.suppress(psutil.Error):
                lines.append(" ".join(proc.cmdline()))
        return lines

    def daemon_heartbeats(self) -> set[str]:
        """The daemons that wrote a heartbeat into the instance (read-only: never racing the
        daemon's creation of its storage)."""
        runs_db = self.home / "history" / "runs.db"
        if not runs_db.exists():
            return set()
        try:
            with contextlib.closing(sqlite3.connect(f"file:{runs_db}?mode=ro", uri=True, timeout=5)) as conn:
                return {row[0] for row in conn.execute("SELECT daemon_type FROM daemon_heartbeats")}
        except sqlite3.OperationalError:  # the table is not created yet
            return set()

    def wait_for_daemon(self, timeout_s: float = 180) -> None:
        """The daemon beats (its sensor daemon among them) and its code server is up."""
        wait_until(lambda: self.running() and "SENSOR" in self.daemon_heartbeats()
                   and any("api grpc" in line for line in self.cmdlines()), timeout_s,
                   f"the daemon's heartbeat in {self.home}")

    def stop(self, signum: int, timeout_s: float = 90) -> tuple[int, list[psutil.Process]]:
        """Sends `signum` to serve alone; returns its exit code and every process of its tree (as
        recorded just before the signal) still alive the moment it exited."""
        assert self.process is not None
        family = self.family()
        assert len(family) > 1, self.cmdlines()
        os.kill(self.process.pid, signum)
        code = self.process.wait(timeout=timeout_s)
        left = {proc.pid: proc for proc in family + self.family() if alive(proc)}
        return code, list(left.values())
