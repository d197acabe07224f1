"""The cross-process limits, on their own: counted the way a server counts requests."""

import multiprocessing
import threading
import time

from call_pipeline.clients.limits import SharedRateLimiter, SharedSemaphore


def _send_times(name: str, rate: float, state_dir, seconds: float, threads: int) -> list[float]:
    limiter = SharedRateLimiter(name, rate, state_dir)
    times: list[float] = []
    lock = threading.Lock()
    deadline = time.time() + seconds

    def worker() -> None:
        while time.time() < deadline:
            limiter.acquire()
            with lock:
                times.append(time.time())

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return times


def _max_in_any_second(times: list[float]) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


def _process_worker(args) -> list[float]:
    name, rate, state_dir, seconds = args
    return _send_times(name, rate, state_dir, seconds, threads=4)


def test_rate_holds_in_every_sliding_second_across_threads_and_processes(tmp_path):
    rate = 25
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        parts = pool.map(_process_worker, [("shared", rate, tmp_path, 2.5)] * 3)
    times = [t for part in parts for t in part]
    assert _max_in_any_second(times) <= rate
    assert len(times) >= rate * 2  # the limiter lets requests through, not just holds them


def test_fractional_rates_space_requests(tmp_path):
    times = _send_times("slow", 2.5, tmp_path, 1.6, threads=3)
    assert _max_in_any_second(times) <= 2


def test_semaphore_never_has_more_holders_than_slots(tmp_path):
    semaphore = SharedSemaphore("llm", 3, tmp_path)
    holders, most = 0, 0
    lock = threading.Lock()

    def hold() -> None:
        nonlocal holders, most
        with semaphore.hold():
            with lock:
                holders += 1
                most = max(most, holders)
            time.sleep(0.02)
            with lock:
                holders -= 1

    threads = [threading.Thread(target=hold) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == 3


def test_the_ring_keeps_the_last_n_send_times_and_a_damaged_file_starts_afresh(tmp_path):
    limiter = SharedRateLimiter("ring", 3, tmp_path)
    for _ in range(3):  # three sends fit in one window, each its half share after the one before
        while (wait := limiter._try_send()) > 0:
            assert wait <= limiter.min_gap
            time.sleep(wait)
    wait = limiter._try_send()
    assert 0 < wait <= limiter.window  # the fourth waits for the oldest of the last three
    assert limiter.path.stat().st_size == 4 + 8 * 3
    limiter.path.write_bytes(b"\x01")  # cut short: not a state the limiter can read
    assert limiter._try_send() == 0.0
    assert limiter.path.stat().st_size == 4 + 8 * 3


def test_a_window_of_sends_is_spread_over_half_of_it_not_let_go_at_once(tmp_path):
    limiter = SharedRateLimiter("spread", 12, tmp_path)
    started = time.monotonic()
    assert limiter._try_send() == 0.0
    wait = limiter._try_send()
    assert 0 < wait <= limiter.min_gap  # the second waits its half share, not for the window
    for _ in range(11):
        while (wait := limiter._try_send()) > 0:
            time.sleep(wait)
    # the window's 12 fit in it, so the rate is the window's; the 13th waits for the window
    assert time.monotonic() - started < limiter.window
    assert limiter._try_send() > limiter.min_gap


def test_a_very_high_rate_keeps_one_slot_per_request(tmp_path):
    limiter = SharedRateLimiter("fast", 1_000_000, tmp_path)
    for _ in range(100):
        assert limiter._try_send() == 0.0
    index = int.from_bytes(limiter.path.read_bytes()[:4], "little")
    assert index == 100  # the ring moved one slot per send


class _Counted:
    """Counts the calls of a limiter's own method (the real one runs)."""

    def __init__(self, target, name: str) -> None:
        self.calls = 0
        self._lock = threading.Lock()
        original = getattr(target, name)

        def counted(*args, **kwargs):
            with self._lock:
                self.calls += 1
            return original(*args, **kwargs)

        setattr(target, name, counted)


def test_threads_waiting_for_a_slot_take_turns_instead_of_each_polling(tmp_path):
    semaphore = SharedSemaphore("turns", 1, tmp_path)
    tries = _Counted(semaphore, "_try_slots")
    waiters, held_s = 40, 1.0
    semaphore._local = threading.BoundedSemaphore(waiters + 1)  # let every thread reach the files

    def holder(ready: threading.Event) -> None:
        with semaphore.hold():
            ready.set()
            time.sleep(held_s)

    ready = threading.Event()
    first = threading.Thread(target=holder, args=(ready,))
    first.start()
    ready.wait()
    done = []

    def wait_then_release() -> None:
        with semaphore.hold():
            done.append(1)

    threads = [threading.Thread(target=wait_then_release) for _ in range(waiters)]
    for thread in threads:
        thread.start()
    first.join()
    for thread in threads:
        thread.join(timeout=30)
    assert len(done) == waiters
    # Polling alone would be 40 threads x 200 tries a second over the held second (8,000): one
    # waiter polls at a time (about 200 a second) and each other thread tries once or twice.
    assert tries.calls < 1_500, tries.calls


def test_threads_waiting_for_the_rate_take_turns_instead_of_each_polling(tmp_path):
    limiter = SharedRateLimiter("turns", 20.0, tmp_path)
    tries = _Counted(limiter, "_try_send")
    waiters = 60  # the first 20 go within half a second, the next 40 within about two seconds

    threads = [threading.Thread(target=limiter.acquire) for _ in range(waiters)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert time.monotonic() - started >= 1.0  # the rate held
    # Each of the 40 that waited would retry every 50 ms on its own (about 1,600 tries): in
    # turns, one retries at a time.
    assert tries.calls < 600, tries.calls
