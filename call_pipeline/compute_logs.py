"""The instances' compute log manager (`compute_logs` in both dagster.yaml files): Dagster's local
one, whose mirror of a step's output costs no process.

Dagster's `LocalComputeLogManager` keeps each step's stdout and stderr in files under the
instance's `storage/` (the UI's step logs) and mirrors them to the process's own output by
starting, for each stream of each step, a `tail -F` and a Python watcher process: four processes
a step (measured: 100 runs of a 3-lead task on a Celery run worker took 82.6 s of its CPU without
them, 87.7 s with them; README "Runs on Celery workers"). Here one thread per stream copies what the step writes to its
file and to where the output went before; the files, what the UI shows and what the terminal
shows stay the same. Dagster has no option for this, hence the class. Off the main thread (runs
side by side in a Celery threads pool) it captures as Dagster does.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import threading
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

from dagster import Field, Float, StringSource
from dagster._core.instance.ref import compute_logs_directory
from dagster._core.storage.compute_log_manager import CapturedLogContext, ComputeIOType
from dagster._core.storage.local_compute_log_manager import IO_TYPE_EXTENSION, LocalComputeLogManager
from dagster._serdes import ConfigurableClassData
from dagster._utils import ensure_file, touch_file

# How long the copy waits for more output once the step has ended, when a process the step
# started still holds the stream (its output after that goes nowhere, as with Dagster's tail).
_DRAIN_WAIT_S = 0.5


class MirroredComputeLogManager(LocalComputeLogManager):
    """Dagster's local compute log manager; `base_dir` defaults to the instance's `storage/`, as
    Dagster's does when `compute_logs` is not configured."""

    def __init__(self, base_dir: str | None = None, polling_timeout: float | None = None,
                 inst_data: ConfigurableClassData | None = None) -> None:
        super().__init__(base_dir or "", polling_timeout=polling_timeout, inst_data=inst_data)
        self._base_dir_configured = bool(base_dir)

    @classmethod
    def config_type(cls) -> dict:
        return {"base_dir": Field(StringSource, is_required=False), "polling_timeout": Field(Float, is_required=False)}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
                          ) -> MirroredComputeLogManager:
        return cls(inst_data=inst_data, **config_value)

    def register_instance(self, instance: Any) -> None:
        super().register_instance(instance)
        if not self._base_dir_configured:
            self._base_dir = compute_logs_directory(instance.root_directory)

    @contextmanager
    def capture_logs(self, log_key: Sequence[str]) -> Generator[CapturedLogContext, None, None]:
        if threading.current_thread() is not threading.main_thread():
            # Runs side by side in one process (a Celery threads pool) would take the process's
            # stdout and stderr from each other: Dagster's own way there, as before.
            with super().capture_logs(log_key) as context:
                yield context
            return
        outpath = self.get_captured_local_path(log_key, IO_TYPE_EXTENSION[ComputeIOType.STDOUT])
        errpath = self.get_captured_local_path(log_key, IO_TYPE_EXTENSION[ComputeIOType.STDERR])
        with mirrored(sys.stdout, outpath), mirrored(sys.stderr, errpath):
            yield CapturedLogContext(log_key)
        # as Dagster's: the artifact says the capture is complete
        touch_file(self.complete_artifact_path(log_key))


@contextmanager
def mirrored(stream: TextIO, path: str) -> Iterator[None]:
    """While inside, whatever is written to `stream`'s file descriptor (by Python, C code or a
    child process) is appended to the file at `path` and still reaches where it went before."""
    ensure_file(path)
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (a test runner's)
        yield
        return
    stream.flush()
    before = os.dup(fd)
    read_end, write_end = os.pipe()
    os.dup2(write_end, fd)
    os.close(write_end)
    stop = threading.Event()
    copier = threading.Thread(target=_copy, args=(read_end, path, before, stop), name=f"mirror-fd{fd}", daemon=True)
    copier.start()
    try:
        yield
    finally:
        with contextlib.suppress(ValueError, OSError):
            stream.flush()
        os.dup2(before, fd)  # the pipe's last write end in this process closes
        stop.set()
        copier.join()
        os.close(read_end)
        os.close(before)


def _copy(read_end: int, path: str, target: int, stop: threading.Event) -> None:
    until = None
    with open(path, "ab", buffering=0) as file:
        while True:
            ready, _, _ = select.select([read_end], [], [], _DRAIN_WAIT_S)
            if stop.is_set():
                until = until or time.monotonic() + _DRAIN_WAIT_S
                if not ready or time.monotonic() > until:
                    return
            if not ready:
                continue
            data = os.read(read_end, 65536)
            if not data:
                return
            file.write(data)
            _write_all(target, data)


def _write_all(fd: int, data: bytes) -> None:
    # The mirror is a courtesy: a closed terminal must not fail the step.
    with contextlib.suppress(OSError):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
