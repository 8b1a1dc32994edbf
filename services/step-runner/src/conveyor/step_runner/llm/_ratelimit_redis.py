"""Rate limits shared by every runner process, as token buckets in Redis.

Each key has two hashes (the requests and the tokens bucket: ``level``, ``updated``) and a
string holding the "not before" time of a penalty. Lua scripts read and update them
atomically and take the time from Redis (``TIME``), so that processes on machines with
different clocks agree. A bucket expires once it would have refilled, so idle keys vanish
(an absent bucket is a full one, see ``_ratelimit_bucket``). The three keys share a hash
tag, so the scripts also run on a Redis Cluster.

Redis must never be the reason a step fails: when it does not answer, the call falls back
to this process's own ``LocalRateLimiter`` (a warning is logged once per outage) and Redis
is tried again ``retry_redis_after`` seconds later.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import NoScriptError, RedisError

from conveyor.step_runner.llm._ratelimit_bucket import RateLimit, check_tokens
from conveyor.step_runner.llm._ratelimit_headers import penalty_from_headers
from conveyor.step_runner.llm._ratelimit_local import MIN_SLEEP_SECONDS, LocalRateLimiter
from conveyor.step_runner.llm._redis_cancel import cancel_requests, honour_lost_cancel

__all__ = ["DEFAULT_PREFIX", "RedisRateLimiter"]

DEFAULT_PREFIX = "conveyor:ratelimit"
logger = logging.getLogger(__name__)

# Numbers leave Lua as integers (truncated), so every time and level travels as text.
_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function fmt(x) return string.format('%.6f', x) end
local function load(key, rate, capacity)
  local stored = redis.call('HMGET', key, 'level', 'updated')
  local level, updated = tonumber(stored[1]), tonumber(stored[2])
  if level == nil or updated == nil then return capacity, now end
  return math.min(capacity, level + math.max(0, now - updated) * rate), math.max(now, updated)
end
local function store(key, level, updated, rate, capacity)
  if level >= capacity then
    redis.call('DEL', key)
    return
  end
  redis.call('HSET', key, 'level', fmt(level), 'updated', fmt(updated))
  -- expire once full again, plus a second's slack for the clocks of the caller
  redis.call('PEXPIRE', key, math.ceil((capacity - level) / rate * 1000) + 1000)
end
"""

# KEYS: requests bucket, tokens bucket, penalty. ARGV: request rate/s, capacity, token
# rate/s, capacity, tokens (a rate of 0: unlimited). Returns the seconds to wait; "0" means
# taken. All or nothing, like ``_ratelimit_bucket.attempt``.
_ACQUIRE = (
    _PRELUDE
    + """
local not_before = tonumber(redis.call('GET', KEYS[3]) or '0')
if not_before > now then return fmt(not_before - now) end
local wait, updates = 0, {}
for i = 1, 2 do
  local rate, capacity = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  if rate > 0 then
    local amount = 1
    if i == 2 then amount = tonumber(ARGV[5]) end
    local level, updated = load(KEYS[i], rate, capacity)
    local need = math.min(amount, capacity)
    if level < need then wait = math.max(wait, (need - level) / rate) end
    updates[i] = {level - amount, updated, rate, capacity}
  end
end
if wait > 0 then return fmt(wait) end
for i, u in pairs(updates) do store(KEYS[i], u[1], u[2], u[3], u[4]) end
return '0'
"""
)

# KEYS: tokens bucket. ARGV: rate/s, capacity, tokens to take (negative: give back).
_CHARGE = (
    _PRELUDE
    + """
local rate, capacity, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local level, updated = load(KEYS[1], rate, capacity)
level = level - tokens
if tokens < 0 then level = math.min(level, capacity) end
store(KEYS[1], level, updated, rate, capacity)
return '0'
"""
)

# KEYS: penalty. ARGV: seconds. A penalty only ever extends the "not before" time.
_PENALIZE = (
    _PRELUDE
    + """
local seconds = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if now + seconds > current then
  redis.call('SET', KEYS[1], fmt(now + seconds), 'PX', math.ceil(seconds * 1000) + 1000)
end
return '0'
"""
)


@dataclass(frozen=True, slots=True)
class _Script:
    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> _Script:
        return cls(source, hashlib.sha1(source.encode()).hexdigest())


_ACQUIRE_SCRIPT = _Script.of(_ACQUIRE)
_CHARGE_SCRIPT = _Script.of(_CHARGE)
_PENALIZE_SCRIPT = _Script.of(_PENALIZE)


class _RedisUnavailable(Exception):
    pass


class RedisRateLimiter:
    """Token buckets in Redis, shared by every process that uses the same Redis and prefix.

    Within one process the waiters of a key queue behind a lock, so that each process has
    one waiter polling Redis per key however many steps wait.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        retry_redis_after: float = 5.0,
        local: LocalRateLimiter | None = None,
    ) -> None:
        # Fail fast: a limiter that hangs on a dead Redis holds up every LLM step.
        self._redis: Redis = Redis.from_url(
            url,
            socket_connect_timeout=1.0,
            socket_timeout=2.0,
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
        )
        self._where = _redacted(url)
        self._prefix = prefix
        self._retry_redis_after = retry_redis_after
        self._local = local or LocalRateLimiter()
        self._locks: dict[str, asyncio.Lock] = {}
        self._down_until = 0.0
        self._down = False

    async def acquire(self, key: str, limit: RateLimit, *, tokens: int) -> float:
        """Wait until one request and ``tokens`` tokens are free; the seconds waited."""
        check_tokens(tokens)
        start = time.monotonic()
        lock = self._locks.setdefault(key, asyncio.Lock())
        waited = lock.locked()
        async with lock:
            while True:
                try:
                    wait = await self._attempt(key, limit, tokens=tokens)
                except _RedisUnavailable:
                    local_wait = await self._local.acquire(key, limit, tokens=tokens)
                    waited = waited or local_wait > 0
                    break
                if wait <= 0:
                    break
                # Jitter keeps processes that wait on one key from polling in lockstep.
                jitter = random.uniform(0, min(0.02, wait / 10))
                await asyncio.sleep(max(wait, MIN_SLEEP_SECONDS) + jitter)
                waited = True
        return time.monotonic() - start if waited else 0.0

    async def penalize(self, key: str, seconds: float) -> None:
        """Nobody sharing ``key``, in any process, sends for ``seconds``."""
        if seconds <= 0:
            return
        # Also here, so that this process honours it should Redis go away meanwhile.
        await self._local.penalize(key, seconds)
        with contextlib.suppress(_RedisUnavailable):
            await self._run(_PENALIZE_SCRIPT, [self._key(key, "penalty")], [seconds])

    async def observe(self, key: str, headers: Mapping[str, str]) -> None:
        """Penalise ``key`` when the provider's headers say its window is spent."""
        seconds = penalty_from_headers(headers, now=datetime.now(UTC))
        if seconds:
            await self.penalize(key, seconds)

    async def settle(self, key: str, limit: RateLimit, *, estimated: int, actual: int) -> None:
        """Refund (or charge) the difference between the tokens acquired and those used."""
        spec = limit.tokens
        if spec is None or actual == estimated:
            return
        keys = [self._key(key, "tokens")]
        try:
            await self._run(_CHARGE_SCRIPT, keys, [spec.rate, spec.capacity, actual - estimated])
        except _RedisUnavailable:
            await self._local.settle(key, limit, estimated=estimated, actual=actual)

    async def aclose(self) -> None:
        """Close the connections to Redis."""
        await self._redis.aclose()

    async def _attempt(self, key: str, limit: RateLimit, *, tokens: int) -> float:
        requests, token_spec = limit.requests, limit.tokens
        args = [
            requests.rate if requests else 0,
            requests.capacity if requests else 0,
            token_spec.rate if token_spec else 0,
            token_spec.capacity if token_spec else 0,
            tokens,
        ]
        keys = [self._key(key, part) for part in ("requests", "tokens", "penalty")]
        return float(await self._run(_ACQUIRE_SCRIPT, keys, args))

    def _key(self, key: str, part: str) -> str:
        return f"{self._prefix}:{{{key}}}:{part}"

    async def _run(self, script: _Script, keys: list[str], args: list[Any]) -> str:
        """EVALSHA, or EVAL when Redis lost its script cache; ``_RedisUnavailable`` on failure."""
        if self._down and time.monotonic() < self._down_until:
            raise _RedisUnavailable
        cancels = cancel_requests()
        try:
            try:
                result = await self._redis.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                result = await self._redis.eval(script.source, len(keys), *keys, *args)
        except (RedisError, OSError) as exc:
            self._went_down(exc)
            honour_lost_cancel(cancels)
            raise _RedisUnavailable from exc
        if self._down:
            self._down = False
            logger.info("Redis at %s answers again; rate limits are shared again", self._where)
        honour_lost_cancel(cancels)
        return result.decode() if isinstance(result, bytes) else str(result)

    def _went_down(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self._retry_redis_after
        if self._down:
            logger.debug("Redis at %s still unavailable: %s", self._where, exc)
            return
        self._down = True
        logger.warning(
            "Redis at %s is unavailable (%s: %s); rate limits are per process until it "
            "answers again (next try in %.0fs)",
            self._where,
            type(exc).__name__,
            exc,
            self._retry_redis_after,
        )


def _redacted(url: str) -> str:
    """The URL without its password, fit for a log line."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        where = f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        where = host
    return f"{parts.scheme}://{where}{parts.path}" if where else f"{parts.scheme}://{parts.path}"
