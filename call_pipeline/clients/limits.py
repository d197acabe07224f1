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
    explicit = os.environ.get("CALL_PIPELINE_STATE_DIR")
    if explicit:
        return Path(explicit)
    dagster_home = os.environ.get("DAGSTER_HOME")
    if dagster_home:
        return Path(dagster_home) / "call_pipeline_limits"
    return Path(tempfile.gettempdir()) / "call_pipeline_limits"


def _safe_name(name: str) -> str:
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    readable = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:40]
    return f"{readable}-{digest}"


class SharedRateLimiter:
    """At most `rate` acquisitions per second across processes (GCRA: each caller reserves the
    next free slot, spaced 1/rate apart, then sleeps until it). Slots are spaced slightly wider
    than 1/rate so that the arrivals a server counts per second stay under the cap despite jitter."""

    SAFETY = 0.97

    def __init__(self, name: str, rate: float, state_dir: Path | None = None) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.name = name
        self.rate = float(rate)
        self.interval = 1.0 / (self.rate * self.SAFETY)
        folder = state_dir or default_state_dir()
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rate-{_safe_name(name)}.bin"
        self._local = threading.Lock()

    def reserve(self) -> float:
        """Reserve the next slot; return how long the caller must wait before sending."""
        with self._local, open(self.path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                handle.seek(0)
                raw = handle.read(8)
                next_free = struct.unpack("d", raw)[0] if len(raw) == 8 else 0.0
                now = time.time()
                slot = max(now, next_free)
                handle.seek(0)
                handle.truncate()
                handle.write(struct.pack("d", slot + self.interval))
                handle.flush()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return max(0.0, slot - now)

    def acquire(self) -> float:
        wait = self.reserve()
        if wait > 0:
            time.sleep(wait)
        return wait


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
        while True:
            for offset in range(self.slots):
                index = (start + offset) % self.slots
                fd = os.open(self._paths[index], os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                return fd, index
            time.sleep(self.POLL_SECONDS)
