"""Tests marked `serial` run while no other test runs, under pytest-xdist too.

A few tests measure the machine itself: requests per wall-clock second at the simulator, a read
timeout's wall time. Beside three other workers' runs and servers on two cores, a grant can reach
the simulator later than the limiter's margin allows, and those tests would measure the load, not
the code. Every other test holds a shared lock while it runs; a serial test holds it exclusively.
pytest-xdist has no such option (its groups only pin tests to one worker), hence this hand-written
readers-writer lock on two files with `flock`: a serial test first closes the gate, so that no
new test starts, then waits for the running ones to end.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Set by the controlling pytest process before its workers start; they inherit it.
LOCK_DIR_VARIABLE = "CALL_PIPELINE_TEST_SERIAL_LOCK_DIR"


def make_lock_dir() -> str:
    path = tempfile.mkdtemp(prefix="call_pipeline_serial_")
    os.environ[LOCK_DIR_VARIABLE] = path
    return path


def remove_lock_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.environ.get(LOCK_DIR_VARIABLE) == path:
        del os.environ[LOCK_DIR_VARIABLE]


@contextmanager
def holding(lock_dir: str, serial: bool) -> Iterator[None]:
    """Hold the suite's lock: exclusively for a serial test, shared for any other."""
    directory = Path(lock_dir)
    with open(directory / "gate", "a") as gate, open(directory / "running", "a") as running:
        if serial:
            fcntl.flock(gate, fcntl.LOCK_EX)  # no new test starts from here on
            fcntl.flock(running, fcntl.LOCK_EX)  # the running ones have ended
            try:
                yield
            finally:
                fcntl.flock(running, fcntl.LOCK_UN)
                fcntl.flock(gate, fcntl.LOCK_UN)
            return
        # The gate is taken in the same order as by a serial test, and only for a moment.
        fcntl.flock(gate, fcntl.LOCK_SH)
        fcntl.flock(running, fcntl.LOCK_SH)
        fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(running, fcntl.LOCK_UN)
