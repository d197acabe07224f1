"""The account's limits shared through Redis (CALL_PIPELINE_REDIS_URL), for every process on
every machine that uses that Redis: OutboundBot requests per second as grants spaced evenly apart
(a Lua script timed by Redis's own clock), LLM calls in flight as leases that expire, so that a
process that dies frees its slots within a minute. Redis configured but unreachable is an error
for the unit that needed the limit (`LimitUnavailable`), never "no limit"."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator

import redis

# The cloud counts requests when they arrive, per wall-clock second; a request arrives a little
# after its grant, by a delay that varies (the answer from Redis, the GIL, the bytes through the
# socket, the cloud's own scheduling). Grants spaced (1 + JITTER_SECONDS) / rate apart put rate + 1
# consecutive requests more than 1 + JITTER_SECONDS apart, so no wall-clock second sees more than
# the rate unless two requests' delays differ by more than JITTER_SECONDS (measured: a few ms at
# p99, README "Shared limits"). The file limiter's window is widened by the same 5%.
JITTER_SECONDS = 0.05
POLL_SECONDS = 0.01
MAX_SLEEP_SECONDS = 1.0


class LimitUnavailable(ConnectionError):
    """The shared limit's Redis could not be reached: the call is not made without its limit."""


def _unavailable(url: str, exc: Exception) -> LimitUnavailable:
    safe = redis.connection.parse_url(url)
    where = f"{safe.get('host', '?')}:{safe.get('port', 6379)}"
    return LimitUnavailable(f"CALL_PIPELINE_REDIS_URL is set but Redis at {where} is unreachable "
                            f"({type(exc).__name__}); the call waits for its shared limit and is retried")


# One grant if the last one (KEYS[1], microseconds of Redis's clock) is at least ARGV[1]
# microseconds ago: 0, and this grant is recorded; else the microseconds left to wait. Hand-written
# because the `limits` library (5.8) has only windows (fixed, moving, sliding counter), which let a
# whole window's worth go at once and time each hit by the caller's clock read before the round
# trip: a burst that is let go together, stamped early, is what crossed the cloud's second
# boundary (README "Shared limits"). The time is Redis's, read when the grant is decided, so every
# machine spaces its requests by one clock.
_GRANT = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000000 + tonumber(now[2])
local spacing = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
if now < last + spacing then
  return last + spacing - now
end
redis.call('SET', KEYS[1], string.format('%d', now), 'PX', math.ceil(spacing / 1000) + 60000)
return 0
"""


class RedisRateLimiter:
    """At most `rate` requests a second across every process that uses this Redis, each grant
    at least (1 + JITTER_SECONDS) / rate after the previous one, measured from when the previous
    one was actually granted (a waiter that wakes late delays the next grant instead of bunching
    with it)."""

    def __init__(self, url: str, name: str, rate: float, prefix: str) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.url, self.name = url, name
        self.spacing = (1.0 + JITTER_SECONDS) / rate
        self.key = f"{prefix}:grants:{name}"
        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._grant = self._redis.register_script(_GRANT)
        self.granted_at = 0.0  # this machine's clock when the last grant came back
        self._turn = threading.Lock()

    def acquire(self) -> float:
        """Wait until a request may go; return how long that took."""
        started = time.monotonic()
        spacing_us = max(1, round(self.spacing * 1_000_000))
        # One waiter per process asks Redis; the process's other threads wait for their turn on
        # this lock, without a call each per grant (64 threads at 20 QPS were 1,280 calls a second).
        with self._turn:
            while True:
                try:
                    wait_us = int(self._grant(keys=[self.key], args=[spacing_us]))
                except (redis.RedisError, OSError) as exc:
                    raise _unavailable(self.url, exc) from None
                if wait_us <= 0:
                    self.granted_at = time.time()
                    return time.monotonic() - started
                time.sleep(min(wait_us / 1_000_000, MAX_SLEEP_SECONDS))


# Take a lease if fewer than ARGV[1] unexpired ones are held: KEYS[1] a sorted set of lease ids
# scored by their expiry. Atomic in Redis; hand-written because `limits` has no concurrency limit.
_TAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[2])
  redis.call('EXPIRE', KEYS[1], 3600)
  return 1
end
return 0
"""


class RedisLeaseSemaphore:
    """At most `slots` holders at once across processes and machines. A holder's lease lasts
    `lease_seconds` (CALL_PIPELINE_REDIS_LEASE_SECONDS) and is renewed a third of that while it is held; a holder
    that dies stops renewing, and its slot is free once the lease runs out."""

    def __init__(self, url: str, name: str, slots: int, prefix: str, lease_seconds: float) -> None:
        self.url, self.slots = url, slots
        self.lease_seconds = lease_seconds
        self.key = f"{prefix}:leases:{name}"
        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._take = self._redis.register_script(_TAKE)

    @contextlib.contextmanager
    def hold(self) -> Iterator[str]:
        lease = uuid.uuid4().hex
        try:
            while not self._take(keys=[self.key], args=[self.slots, lease, time.time(),
                                                          time.time() + self.lease_seconds]):
                time.sleep(POLL_SECONDS)
        except (redis.RedisError, OSError) as exc:
            raise _unavailable(self.url, exc) from None
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.lease_seconds / 3):
                with contextlib.suppress(redis.RedisError, OSError):
                    self._redis.zadd(self.key, {lease: time.time() + self.lease_seconds}, xx=True)

        # the renewal ends with the hold: it is joined before hold() returns
        renewal = threading.Thread(target=renew, name="call-pipeline-lease", daemon=True)
        renewal.start()
        try:
            yield lease
        finally:
            done.set()
            renewal.join()
            with contextlib.suppress(redis.RedisError, OSError):
                self._redis.zrem(self.key, lease)

    def held(self) -> int:
        self._redis.zremrangebyscore(self.key, "-inf", time.time())
        return int(self._redis.zcard(self.key))
