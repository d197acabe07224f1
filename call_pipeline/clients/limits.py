"""Limits that protect the cloud account, shared by every thread, op and run on this machine.

Dagster runs each run (and, with the multiprocess executor, each step) in its own process, so an
in-process limiter would let N runs send N times the allowed rate. Both limiters keep their state
in small files under one folder and coordinate with `fcntl.flock`, which the kernel releases when
a process dies: a killed run never leaks a slot. No library offers a cross-process rate limiter
without a server (Redis would be one more thing for the embedded demo to need), hence this file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path


def default_state_dir() -> Path:
    """Where the limiters keep their files: `CALL_PIPELINE_STATE_DIR`, else the Dagster home,
    else the system temp folder. Every process of one Dagster instance resolves the same folder."""
    from call_pipeline.settings import settings

    if settings().state_dir:
        return Path(settings().state_dir)
    dagster_home = os.environ.get("DAGSTER_HOME")
    if dagster_home:
        return Path(dagster_home) / "call_pipeline_limits"
    return Path(tempfile.gettempdir()) / "call_pipeline_limits"


def _safe_name(name: str) -> str:
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    readable = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:40]
    return f"{readable}-{digest}"


_INDEX = struct.Struct("<I")
_SLOT = struct.Struct("<d")


class SharedRateLimiter:
    """At most `rate` requests per second across processes, counted the way a server counts
    them: by when each request is actually let go. The state file keeps the send times of the
    last N requests (N = the rate, rounded down, at least 1); a caller may go only when the
    oldest of them is more than a window (N / rate seconds and at least one, widened by `MARGIN`
    for jitter) old, and records its own send time as it goes. It counts real send times rather
    than reserving future slots (GCRA), with which threads that wake late bunch up.

    Consecutive sends are also at least half a window's share (window / 2N) apart: N let go in
    one burst reach the cloud as late as the machine takes to send the last of them, and on a
    busy machine that spread can pass the window's margin (README "Shared limits"). A window's N
    still fit in half of it, so the window stays the binding limit and the rate is the same."""

    # Wider than a second: a request recorded as sent reaches the server's counter a little later
    # on a busy machine (the GIL, the server's own scheduling); figures in the README.
    MARGIN = 1.05
    MAX_POLL_SECONDS = 0.05

    def __init__(self, name: str, rate: float, state_dir: Path | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.name = name
        self.rate = float(rate)
        self.burst = max(1, int(self.rate))
        # Never shorter than a second: N sends in any one second is what a server's counter sees.
        self.window = max(1.0, self.burst / self.rate) * self.MARGIN
        self.min_gap = self.window / (2 * self.burst)
        folder = state_dir or default_state_dir()
        folder.mkdir(parents=True, exist_ok=True)
        # The burst is part of the name: processes configured with different rates keep apart.
        self.path = folder / f"rate-{_safe_name(name)}-{self.burst}.bin"
        # The file: the index of the oldest send time, then the last N send times as a ring. A
        # decision reads and writes one slot, not the whole ring (at a rate of 1,000,000, a ring
        # of 8 MB rewritten per request took 30 ms of CPU).
        self._size = _INDEX.size + _SLOT.size * self.burst
        self._local = threading.Lock()
        self._turnstile = folder / f"rate-{_safe_name(name)}-{self.burst}.wait"

    def _try_send(self) -> float:
        """Record a send now and return 0, or return how long to wait before trying again."""
        with self._local:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed
                if os.fstat(fd).st_size != self._size:
                    os.ftruncate(fd, self._size)  # new (or damaged): zeros, no send recorded yet
                index = _INDEX.unpack(os.pread(fd, _INDEX.size, 0))[0] % self.burst
                offset = _INDEX.size + _SLOT.size * index
                oldest = _SLOT.unpack(os.pread(fd, _SLOT.size, offset))[0]
                latest_offset = _INDEX.size + _SLOT.size * ((index - 1) % self.burst)
                latest = _SLOT.unpack(os.pread(fd, _SLOT.size, latest_offset))[0]
                now = time.time()
                wait = max(self.window - (now - oldest), self.min_gap - (now - latest))
                if wait > 0:
                    return wait
                os.pwrite(fd, _SLOT.pack(now), offset)
                os.pwrite(fd, _INDEX.pack((index + 1) % self.burst), 0)
                return 0.0
            finally:
                os.close(fd)

    def acquire(self) -> float:
        """Wait until a request may go; return how long that took."""
        started = time.monotonic()
        if self._try_send() > 0:
            with _turnstile(self._turnstile):
                while (wait := self._try_send()) > 0:
                    time.sleep(min(wait, self.MAX_POLL_SECONDS))
        return time.monotonic() - started


class SharedSemaphore:
    """At most `slots` holders at once across processes: one lock file per slot, and a holder
    owns a slot while it holds that file's flock."""

    POLL_SECONDS = 0.005

    def __init__(self, name: str, slots: int, state_dir: Path | None = None) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.name = name
        self.slots = slots
        folder = (state_dir or default_state_dir()) / f"sem-{_safe_name(name)}"
        folder.mkdir(parents=True, exist_ok=True)
        self._paths = [folder / f"slot-{i}.lock" for i in range(slots)]
        self._turnstile = folder / "wait.lock"
        # Threads of one process share the kernel locks per open file description, so each
        # acquisition opens its own descriptor; a local semaphore keeps threads from spinning.
        self._local = threading.BoundedSemaphore(slots)
        self._start = 0
        self._start_lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self) -> Iterator[int]:
        self._local.acquire()
        try:
            fd, slot = self._take_slot()
            try:
                yield slot
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        finally:
            self._local.release()

    def _take_slot(self) -> tuple[int, int]:
        with self._start_lock:
            start = self._start
            self._start = (self._start + 1) % self.slots
        taken = self._try_slots(start)
        if taken is not None:
            return taken
        with _turnstile(self._turnstile):
            while (taken := self._try_slots(start)) is None:
                time.sleep(self.POLL_SECONDS)
        return taken

    def _try_slots(self, start: int) -> tuple[int, int] | None:
        for offset in range(self.slots):
            index = (start + offset) % self.slots
            fd = os.open(self._paths[index], os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return fd, index
        return None


@contextlib.contextmanager
def _turnstile(path: Path) -> Iterator[None]:
    """One waiter at a time, across threads and processes: the one holding the turnstile polls
    the limit, the others sleep in the kernel (a blocking flock) until it is their turn. Without
    it every waiting thread polled on its own: with 30 threads of two steps waiting for 16 LLM
    slots, that was a third of the CPU of a run that mostly waits (README "Performance")."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the turnstile


def rate_limiter(name: str, rate: float):
    """The account's rate limit `name`: through Redis when CALL_PIPELINE_REDIS_URL is set (every
    machine), else in this machine's files."""
    from call_pipeline.settings import settings

    if settings().redis_url:
        from call_pipeline.clients.redis_limits import RedisRateLimiter

        return RedisRateLimiter(settings().redis_url, name, rate, settings().redis_key_prefix)
    return SharedRateLimiter(name, rate)


def concurrency_limit(name: str, slots: int):
    """The account's concurrency limit `name`, as `rate_limiter` chooses where it lives."""
    from call_pipeline.settings import settings

    if settings().redis_url:
        from call_pipeline.clients.redis_limits import RedisLeaseSemaphore

        return RedisLeaseSemaphore(settings().redis_url, name, slots, settings().redis_key_prefix,
                                   settings().redis_lease_seconds)
    return SharedSemaphore(name, slots)
