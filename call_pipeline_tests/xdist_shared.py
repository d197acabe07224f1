"""What the pytest-xdist workers of one session share: a folder the controlling process makes
before they start (they inherit its path), holding the lock of `serial` tests and a cache of
results that any worker may compute once for all (the reliability suite's clean runs).

Tests marked `serial` run while no other test runs. A few tests measure the machine itself:
requests per wall-clock second at the simulator, a read timeout's wall time. Beside three other
workers' runs and servers on two cores, a grant can reach the simulator later than the limiter's
margin allows, and those tests would measure the load, not the code. Every other test holds a
shared lock while it runs; a serial test holds it exclusively while its body runs (its
fixtures are made and torn down under the shared lock). pytest-xdist has no such option
(its groups only pin tests to one worker), hence this hand-written readers-writer lock on two
files with `flock`: a serial test first closes the gate, so that no new test starts, then waits
for the running ones to end.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pytest

# Set by the controlling pytest process before its workers start; they inherit it.
SHARED_DIR_VARIABLE = "CALL_PIPELINE_TEST_SHARED_DIR"


def make_shared_dir() -> str:
    path = tempfile.mkdtemp(prefix="call_pipeline_xdist_")
    os.environ[SHARED_DIR_VARIABLE] = path
    return path


def remove_shared_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.environ.get(SHARED_DIR_VARIABLE) == path:
        del os.environ[SHARED_DIR_VARIABLE]


def shared_dir() -> Path | None:
    """The session's shared folder; None outside xdist (one process shares with itself)."""
    path = os.environ.get(SHARED_DIR_VARIABLE)
    return Path(path) if path else None


def computed_once(directory: Path, key: tuple, compute: Callable[[], Any]) -> Any:
    """`compute()` for `key`, made by the first worker that asks and read back by the others (they
    wait for it under the key's lock). The value must pickle."""
    folder = directory / "computed"
    folder.mkdir(exist_ok=True)
    path = folder / hashlib.sha256(repr(key).encode()).hexdigest()
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return pickle.loads(path.read_bytes())
        value = compute()
        path.write_bytes(pickle.dumps(value))
        return value


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


def _is_serial(item: pytest.Item) -> bool:
    return item.get_closest_marker("serial") is not None


def _holding(serial: bool) -> AbstractContextManager:
    directory = shared_dir()
    return holding(str(directory), serial=serial) if directory else nullcontext()


# The session's hooks (registered by conftest.py). A test holds the lock shared while it runs. A
# serial test holds it exclusively only for its body: its fixtures (servers, databases, the clean
# runs it compares with) are made and torn down beside other tests, and the other workers stand
# idle only while it measures.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    if _is_serial(item):
        return (yield)
    with _holding(serial=False):
        return (yield)


def _serial_phase(exclusive: bool) -> Callable:
    """The hook of one phase of a test: around a serial test's phase, the lock held `exclusive`ly
    or shared (any other test holds it shared for its whole protocol)."""
    @pytest.hookimpl(wrapper=True)
    def hook(item: pytest.Item):
        if not _is_serial(item):
            return (yield)
        with _holding(serial=exclusive):
            return (yield)
    return hook


pytest_runtest_setup = _serial_phase(exclusive=False)
pytest_runtest_call = _serial_phase(exclusive=True)
pytest_runtest_teardown = _serial_phase(exclusive=False)


def hand_out_order(items: list[pytest.Item]) -> None:
    """Sorts the session's tests in the order the workers get them: the modules of long tests
    (browser, then slow) first, so that none of them starts last and runs on alone; `serial`
    tests last, since one waits for every running test to end while the other workers stand idle
    (first in their slow module, one held three workers for the browser test's 150 s). Whole
    modules move, except their serial tests, so that a module's fixtures are still made once."""
    long_modules = {marker: {item.module for item in items if item.get_closest_marker(marker)}
                    for marker in ("browser", "slow")}
    items.sort(key=lambda item: (item.get_closest_marker("serial") is not None,
                                 item.module not in long_modules["browser"],
                                 item.module not in long_modules["slow"]))
