"""call_and_write: the calls a step makes side by side, written from the step's own thread."""

import threading
import time

import pytest

from call_pipeline.steps._concurrent import call_and_write

NAME = "test-call-and-write"


class Calls:
    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.lock = threading.Lock()
        self.made: list[int] = []
        self.now = 0
        self.most = 0

    def __call__(self, unit: int) -> int:
        with self.lock:
            self.made.append(unit)
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(self.seconds)
        with self.lock:
            self.now -= 1
        return unit * 10


def _threads_left() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(NAME)]


def test_every_unit_is_called_once_and_written_in_batches_on_the_calling_thread():
    calls, batches, writers = Calls(0.001), [], set()

    def write(batch: list[int]) -> None:
        writers.add(threading.current_thread().name)
        batches.append(batch)

    call_and_write(range(1000), calls, write, threads=8, batch_size=100, max_wait_s=5.0, name=NAME)
    assert sorted(calls.made) == list(range(1000))
    assert sorted(x for b in batches for x in b) == [u * 10 for u in range(1000)]
    assert all(len(b) <= 100 for b in batches) and len(batches) == 10
    assert writers == {threading.current_thread().name}
    assert 1 < calls.most <= 8
    assert _threads_left() == []


def test_results_are_written_within_max_wait_even_when_the_batch_is_not_full():
    written_at: list[float] = []
    started = time.monotonic()
    call_and_write(range(6), Calls(0.1), lambda batch: written_at.append(time.monotonic() - started),
                   threads=1, batch_size=100, max_wait_s=0.15, name=NAME)
    assert len(written_at) >= 2  # one call every 0.1 s: a batch of 100 never fills, the wait flushes it


def test_no_units_no_threads():
    written = []
    call_and_write([], Calls(), written.append, threads=4, batch_size=10, max_wait_s=1.0, name=NAME)
    assert written == [] and _threads_left() == []


def test_a_failed_write_stops_the_calls_not_started_and_ends_every_thread_before_raising():
    calls = Calls(0.002)

    def write(batch: list[int]) -> None:
        raise RuntimeError("the database refused")

    with pytest.raises(RuntimeError, match="the database refused"):
        call_and_write(range(10_000), calls, write, threads=4, batch_size=10, max_wait_s=5.0, name=NAME)
    # Units are handed to the threads a few at a time (2 per thread queued), not all at once: at
    # the first write at most 9 + 8 results are ready and 8 more handed out; the rest never start.
    assert len(calls.made) <= 9 + 8 + 8
    assert _threads_left() == []
    made = len(calls.made)
    time.sleep(0.05)
    assert len(calls.made) == made  # nothing goes on after the step raised


def test_units_given_as_a_generator_are_read_as_they_go():
    handed: list[int] = []

    def units():
        for unit in range(50):
            handed.append(unit)
            yield unit

    seen_when_first_written: list[int] = []
    call_and_write(units(), Calls(0.001), lambda batch: seen_when_first_written.append(len(handed)),
                   threads=2, batch_size=5, max_wait_s=5.0, name=NAME)
    assert len(handed) == 50
    assert seen_when_first_written[0] < 50


def test_a_stop_after_a_write_keeps_that_write_and_ends_every_thread_before_raising():
    calls, written = Calls(0.002), []

    class Stopped(BaseException):
        pass

    def stop() -> None:
        if written:
            raise Stopped

    with pytest.raises(Stopped):
        call_and_write(range(10_000), calls, written.extend, threads=4, batch_size=10, max_wait_s=5.0,
                       name=NAME, stop=stop)
    assert len(written) == 10  # the first batch was written before the stop, and no other
    assert len(calls.made) <= 9 + 8 + 8
    assert _threads_left() == []
