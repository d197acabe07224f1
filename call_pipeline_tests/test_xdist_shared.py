"""What xdist workers share (xdist_shared.py): the readers-writer lock of `serial` tests and the
cache of values computed once, with threads standing for workers (`flock` locks belong to each
open file, so threads exclude each other as processes do)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from call_pipeline_tests.xdist_shared import SHARED_DIR_VARIABLE, computed_once, hand_out_order, holding

pytest_plugins = ["pytester"]


def _hold(lock_dir: str, serial: bool, log: list[str], name: str, entered: threading.Event,
          release: threading.Event) -> threading.Thread:
    def body() -> None:
        with holding(lock_dir, serial=serial):
            log.append(f"{name} in")
            entered.set()
            release.wait(10)
            log.append(f"{name} out")

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def _wait_until_the_gate_is_closed(lock_dir: str) -> None:
    with open(Path(lock_dir) / "gate", "a") as gate:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                fcntl.flock(gate, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            fcntl.flock(gate, fcntl.LOCK_UN)
            time.sleep(0.01)
    raise AssertionError("the serial test never closed the gate")


def test_a_serial_test_waits_for_the_running_ones_and_no_test_starts_beside_it(tmp_path):
    log: list[str] = []
    events = {name: (threading.Event(), threading.Event()) for name in ("first", "serial", "second")}
    first = _hold(str(tmp_path), False, log, "first", *events["first"])
    assert events["first"][0].wait(10)
    serial_test = _hold(str(tmp_path), True, log, "serial", *events["serial"])
    _wait_until_the_gate_is_closed(str(tmp_path))
    assert not events["serial"][0].wait(0.5)  # the running test holds it off
    events["serial"][1].set()  # the serial test may end as soon as it is in
    second = _hold(str(tmp_path), False, log, "second", *events["second"])
    events["second"][1].set()
    assert not events["second"][0].wait(0.5)  # nor does a new test start while it waits
    events["first"][1].set()
    for thread in (first, serial_test, second):
        thread.join(10)
    assert log == ["first in", "first out", "serial in", "serial out", "second in", "second out"]


def test_tests_that_are_not_serial_run_side_by_side(tmp_path):
    log: list[str] = []
    (in_a, out_a), (in_b, out_b) = (threading.Event(), threading.Event()), (threading.Event(), threading.Event())
    a = _hold(str(tmp_path), False, log, "a", in_a, out_a)
    b = _hold(str(tmp_path), False, log, "b", in_b, out_b)
    assert in_a.wait(10) and in_b.wait(10)  # both hold the lock at once
    out_a.set()
    out_b.set()
    a.join(10)
    b.join(10)
    assert sorted(log) == ["a in", "a out", "b in", "b out"]


def test_a_value_asked_by_several_workers_at_once_is_computed_once(tmp_path):
    computed: list[int] = []
    started = threading.Event()

    def compute() -> dict:
        computed.append(1)
        started.set()
        time.sleep(0.3)  # the others ask meanwhile and wait for it
        return {"leads": [1, 2, 3]}

    answers: list[dict] = []
    threads = [threading.Thread(target=lambda: answers.append(computed_once(tmp_path, ("mixed", 7), compute)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert started.is_set() and computed == [1]
    assert answers == [{"leads": [1, 2, 3]}] * 4
    assert computed_once(tmp_path, ("mixed", 8), lambda: "other key") == "other key"


def test_long_modules_are_handed_out_first_and_serial_tests_last(pytester):
    pytester.makeini("[pytest]\nmarkers =\n    slow\n    serial\n    browser\n")
    pytester.makepyfile(
        test_a_quick="def test_quick(): pass",
        test_b_slow="import pytest\npytestmark = pytest.mark.slow\ndef test_slow(): pass\n"
                    "@pytest.mark.serial\ndef test_measures(): pass\ndef test_slow_too(): pass\n",
        test_c_ui="import pytest\n@pytest.mark.browser\ndef test_ui(): pass\ndef test_beside_it(): pass\n")
    items, _ = pytester.inline_genitems()
    assert [item.name for item in items][:2] == ["test_quick", "test_slow"]  # collected in file order
    hand_out_order(items)
    assert [item.name for item in items] == ["test_ui", "test_beside_it", "test_slow", "test_slow_too",
                                             "test_quick", "test_measures"]


SIGNALS_CODE = """
import os, pathlib, time
SIGNALS = pathlib.Path(os.environ["SIGNALS"])

def wait_for(name):
    deadline = time.monotonic() + 15
    while not (SIGNALS / name).exists():
        assert time.monotonic() < deadline, name + " never came"
        time.sleep(0.05)
"""
SERIAL_TEST = SIGNALS_CODE + """
import pytest

@pytest.fixture
def made_beside_the_other_test():
    (SIGNALS / "setup started").touch()
    wait_for("other running")  # the other test runs while this one's fixture is made
    yield

@pytest.mark.serial
def test_measures(made_beside_the_other_test):
    assert not (SIGNALS / "other still running").exists()  # the body runs alone
    (SIGNALS / "body ran").touch()
"""
OTHER_TEST = SIGNALS_CODE + """
def test_other():
    (SIGNALS / "other still running").touch()
    (SIGNALS / "other running").touch()
    wait_for("setup started")
    time.sleep(0.5)
    (SIGNALS / "other still running").unlink()
"""


def test_a_serial_tests_fixtures_are_made_beside_other_tests_and_its_body_runs_alone(pytester, tmp_path):
    """Two pytest processes stand for two workers of one session (the folder of the lock is the
    session's): the serial test's fixture waits for the other test to run, which waits for that
    fixture to start. Under a lock held exclusively for the whole test, one of them would wait
    for the other in vain and fail."""
    from call_pipeline_tests import conftest as project_conftest

    pytester.makeini("[pytest]\nmarkers =\n    serial\n")
    pytester.makeconftest("from call_pipeline_tests.conftest import (pytest_runtest_protocol, pytest_runtest_setup,"
                          " pytest_runtest_call, pytest_runtest_teardown)\n")
    pytester.makepyfile(test_serial=SERIAL_TEST, test_other=OTHER_TEST)
    lock_dir, signals = tmp_path / "session", tmp_path / "signals"
    lock_dir.mkdir()
    signals.mkdir()
    env = {**os.environ, SHARED_DIR_VARIABLE: str(lock_dir), "SIGNALS": str(signals),
           "PYTHONPATH": str(Path(project_conftest.__file__).parents[1])}
    workers = [subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                                cwd=pytester.path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
               for test in ("test_other.py", "test_serial.py")]
    outputs = [worker.communicate(timeout=60)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    assert (signals / "body ran").exists()
