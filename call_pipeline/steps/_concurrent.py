"""Calls made side by side inside one step, written from the step's own thread as they come in.

Hand-written on `concurrent.futures` because no library offers the shape a step needs: N calls in
flight (the shared limits bound them across processes), results written in batches while the
other calls go on, and everything ended (calls cancelled, threads joined) before the step returns
or raises, so that no thread outlives the step that started it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

Unit = TypeVar("Unit")
Result = TypeVar("Result")


def call_and_write(
    units: Iterable[Unit],
    call: Callable[[Unit], Result],
    write: Callable[[list[Result]], None],
    *,
    threads: int,
    batch_size: int,
    max_wait_s: float,
    name: str,
    stop: Callable[[], None] | None = None,
) -> None:
    """Run `call` for every unit on up to `threads` threads and hand the results to `write`, on
    the calling thread, in lists of up to `batch_size` (or what came within `max_wait_s` of the
    oldest unwritten result). `call` reports a unit's failure in its result; an exception from
    `call`, `write` or `stop` (called after each write: it raises when the work is to end early)
    cancels the calls not yet started and is raised once the others ended."""
    todo = iter(units)
    first = next(todo, _END)
    if first is _END:
        return
    workers = max(1, threads)
    # Two units queued per thread keep every thread busy while this one writes; submitting all
    # at once would make each `wait` walk every pending future (quadratic in the batch's size).
    in_flight = 2 * workers
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    try:
        pending: set[Future] = {pool.submit(call, first)}

        def top_up() -> None:
            while len(pending) < in_flight:
                unit = next(todo, _END)
                if unit is _END:
                    return
                pending.add(pool.submit(call, unit))

        top_up()
        ready: list[Result] = []
        oldest = 0.0
        while pending:
            timeout = max(0.0, oldest + max_wait_s - time.monotonic()) if ready else None
            done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
            for future in done:
                if not ready:
                    oldest = time.monotonic()
                ready.append(future.result())
            top_up()
            if ready and (len(ready) >= batch_size or not pending or time.monotonic() - oldest >= max_wait_s):
                batch, ready = ready[:batch_size], ready[batch_size:]
                write(batch)
                oldest = time.monotonic()
                if stop is not None:
                    stop()
        while ready:
            batch, ready = ready[:batch_size], ready[batch_size:]
            write(batch)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()
