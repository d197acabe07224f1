"""The suite's readers-writer lock for `serial` tests (serial.py), with threads standing for
xdist workers: `flock` locks belong to each open file, so threads exclude each other as processes do."""

from __future__ import annotations

import fcntl
import threading
import time
from pathlib import Path

from call_pipeline_tests.serial import holding


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
