"""The account's limits shared through Redis (CALL_PIPELINE_REDIS_URL), for every process on
every machine that uses that Redis: OutboundBot requests per second as a moving window (the
`limits` library's), LLM calls in flight as leases that expire, so that a process that dies frees
its slots within a minute. Redis configured but unreachable is an error for the unit that needed
the limit (`LimitUnavailable`), never "no limit"."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator

import redis
from limits import RateLimitItemPerSecond
from limits.errors import StorageError
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

# Requests a second the window lets go, of the configured rate: what leaves here reaches the
# server's counter a few milliseconds later, and a request counted in the next second there
# would be one too many (the file limiter widens its window by the same 5%).
RATE_SHARE = 0.95
LEASE_SECONDS = 30.0
RENEW_EVERY_SECONDS = 10.0
POLL_SECONDS = 0.01


class LimitUnavailable(ConnectionError):
    """The shared limit's Redis could not be reached: the call is not made without its limit."""


def _unavailable(url: str, exc: Exception) -> LimitUnavailable:
    safe = redis.connection.parse_url(url)
    where = f"{safe.get('host', '?')}:{safe.get('port', 6379)}"
    return LimitUnavailable(f"CALL_PIPELINE_REDIS_URL is set but Redis at {where} is unreachable "
                            f"({type(exc).__name__}); the call waits for its shared limit and is retried")


class RedisRateLimiter:
    def __init__(self, url: str, name: str, rate: float, prefix: str) -> None:
        self.url, self.name = url, name
        self.item = RateLimitItemPerSecond(max(1, int(rate * RATE_SHARE)))
        self._limiter = MovingWindowRateLimiter(RedisStorage(url, key_prefix=prefix, socket_timeout=5,
                                                             socket_connect_timeout=5))
        self.granted_at = 0.0  # the time of the last hit the window let go, as the window counts it

    def acquire(self) -> float:
        started = time.monotonic()
        while True:
            try:
                asked_at = time.time()
                if self._limiter.hit(self.item, self.name):
                    self.granted_at = asked_at
                    return time.monotonic() - started
                reset = self._limiter.get_window_stats(self.item, self.name).reset_time
            except (StorageError, redis.RedisError, OSError) as exc:
                raise _unavailable(self.url, exc) from None
            time.sleep(min(max(reset - time.time(), POLL_SECONDS), 0.2))


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
    LEASE_SECONDS and is renewed while it is held; a holder that dies stops renewing, and its
    slot is free once the lease runs out."""

    def __init__(self, url: str, name: str, slots: int, prefix: str) -> None:
        self.url, self.slots = url, slots
        self.key = f"{prefix}:leases:{name}"
        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._take = self._redis.register_script(_TAKE)

    @contextlib.contextmanager
    def hold(self) -> Iterator[str]:
        lease = uuid.uuid4().hex
        try:
            while not self._take(keys=[self.key], args=[self.slots, lease, time.time(), time.time() + LEASE_SECONDS]):
                time.sleep(POLL_SECONDS)
        except (redis.RedisError, OSError) as exc:
            raise _unavailable(self.url, exc) from None
        done = threading.Event()

        def renew() -> None:
            while not done.wait(RENEW_EVERY_SECONDS):
                with contextlib.suppress(redis.RedisError, OSError):
                    self._redis.zadd(self.key, {lease: time.time() + LEASE_SECONDS}, xx=True)

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
