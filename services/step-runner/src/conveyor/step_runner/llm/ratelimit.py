"""Requests/min and tokens/min per provider+model+key, shared by every runner process.

An LLM step calls, around each provider request::

    key = rate_limit_key("openai", "gpt-4o-mini", api_key)
    waited = await limiter.acquire(key, limit, tokens=prompt_tokens + max_tokens)
    response = ...                                   # the provider call
    await limiter.observe(key, response.headers)     # x-ratelimit-*, anthropic-ratelimit-*
    await limiter.settle(key, limit, estimated=prompt_tokens + max_tokens, actual=used)
    # on a 429: the observe above already honoured Retry-After; retry the step

A limit that is reached makes the step wait, never fail: ``acquire`` sleeps until both one
request and the tokens are free, or until a provider's Retry-After has passed. Steps that
cancel while waiting hold nothing.

With ``CONVEYOR_REDIS_URL`` the buckets live in Redis and every runner process shares
them; without it each process enforces the limits alone (so N processes may send N times
the limit: set the limits per process, or use Redis).

How the buckets are sized is ``RateLimit.burst_seconds``: an idle key may send that many
seconds' worth of its rate at once (6 s by default, a tenth of the per-minute limit), then
the requests flow at the per-minute rate.

The module layout: bucket arithmetic in ``_ratelimit_bucket`` (pure), provider headers in
``_ratelimit_headers`` (pure), ``_ratelimit_local`` and ``_ratelimit_redis`` the two
limiters; this module is what callers import.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Protocol

from conveyor.step_runner.llm._ratelimit_bucket import (
    DEFAULT_BURST_SECONDS,
    Bucket,
    BucketSpec,
    KeyState,
    RateLimit,
    attempt,
    charge,
    penalized,
    refill,
    wait_for,
)
from conveyor.step_runner.llm._ratelimit_headers import (
    MAX_PENALTY_SECONDS,
    parse_go_duration,
    parse_reset,
    parse_retry_after,
    penalty_from_headers,
)
from conveyor.step_runner.llm._ratelimit_local import LocalRateLimiter
from conveyor.step_runner.llm._ratelimit_redis import DEFAULT_PREFIX, RedisRateLimiter

__all__ = [
    "DEFAULT_BURST_SECONDS",
    "DEFAULT_PREFIX",
    "MAX_PENALTY_SECONDS",
    "Bucket",
    "BucketSpec",
    "KeyState",
    "LocalRateLimiter",
    "RateLimit",
    "RateLimiter",
    "RedisRateLimiter",
    "attempt",
    "charge",
    "create_rate_limiter",
    "parse_go_duration",
    "parse_reset",
    "parse_retry_after",
    "penalized",
    "penalty_from_headers",
    "rate_limit_key",
    "refill",
    "wait_for",
]


class RateLimiter(Protocol):
    """What an LLM step needs from a rate limiter, in-process or shared through Redis."""

    async def acquire(self, key: str, limit: RateLimit, *, tokens: int) -> float:
        """Wait until one request and ``tokens`` tokens are free; the seconds waited."""
        ...

    async def penalize(self, key: str, seconds: float) -> None:
        """Nobody sharing ``key`` sends for ``seconds`` (a 429's Retry-After)."""
        ...

    async def observe(self, key: str, headers: Mapping[str, str]) -> None:
        """Read a response's rate-limit headers; a spent window penalises until its reset."""
        ...

    async def settle(self, key: str, limit: RateLimit, *, estimated: int, actual: int) -> None:
        """Correct the tokens bucket once the real usage is known: refund or charge."""
        ...

    async def aclose(self) -> None:
        """Release connections; the limiter is not used afterwards."""
        ...


def rate_limit_key(provider: str, model: str, api_key: str | None) -> str:
    """``provider/model/<sha256(api_key)[:12]>``: limits are per key, but no key is stored.

    Keyless endpoints (a local Ollama) share one key per provider and model.
    """
    digest = hashlib.sha256(api_key.encode()).hexdigest()[:12] if api_key else "-"
    return f"{provider}/{model}/{digest}"


def create_rate_limiter(redis_url: str | None) -> RateLimiter:
    """Limits shared through Redis when a URL is given (``CONVEYOR_REDIS_URL``), else per process.

    Creating the Redis limiter does not connect: a Redis that is down when the runner
    starts costs a warning at the first LLM step and per-process limits, not a crash.
    """
    if redis_url:
        return RedisRateLimiter(redis_url)
    return LocalRateLimiter()
