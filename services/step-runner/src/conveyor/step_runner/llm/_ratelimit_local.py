"""Rate limiting in this process only: the limiter without Redis, and Redis's fallback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime

from conveyor.step_runner.llm._ratelimit_bucket import (
    KeyState,
    RateLimit,
    attempt,
    charge,
    check_tokens,
    penalized,
)
from conveyor.step_runner.llm._ratelimit_headers import penalty_from_headers

__all__ = ["MIN_SLEEP_SECONDS", "LocalRateLimiter"]

MIN_SLEEP_SECONDS = 0.001
"""A computed wait can come out as a rounding error above zero; sleeping at least this
long keeps such a wait from turning into a busy loop."""

_EMPTY = KeyState()


def _utcnow() -> datetime:
    return datetime.now(UTC)


class LocalRateLimiter:
    """Token buckets in this process's memory.

    Waiters on one key queue behind an ``asyncio.Lock`` (which is FIFO): only the head
    sleeps until its tokens are there, so a large prompt is not starved by a stream of
    small ones, and N waiting steps cost one timer, not N.

    ``clock``, ``sleep`` and ``wall_clock`` are the test seam: a fake clock whose sleep
    advances it makes the waits exact and instant.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wall_clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._wall_clock = wall_clock
        self._states: dict[str, KeyState] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def acquire(self, key: str, limit: RateLimit, *, tokens: int) -> float:
        """Wait until one request and ``tokens`` tokens are free; the seconds waited."""
        check_tokens(tokens)
        start = self._clock()
        lock = self._locks.setdefault(key, asyncio.Lock())
        queued = lock.locked()
        slept = False
        async with lock:
            while True:
                state = self._states.get(key, _EMPTY)
                state, wait = attempt(state, limit, tokens=tokens, now=self._clock())
                if wait <= 0:
                    self._states[key] = state
                    return self._clock() - start if queued or slept else 0.0
                await self._sleep(max(wait, MIN_SLEEP_SECONDS))
                slept = True

    async def penalize(self, key: str, seconds: float) -> None:
        """Nobody in this process sends on ``key`` for ``seconds``."""
        if seconds <= 0:
            return
        state = self._states.get(key, _EMPTY)
        self._states[key] = penalized(state, until=self._clock() + seconds)

    async def observe(self, key: str, headers: Mapping[str, str]) -> None:
        """Penalise ``key`` when the provider's headers say its window is spent."""
        seconds = penalty_from_headers(headers, now=self._wall_clock())
        if seconds:
            await self.penalize(key, seconds)

    async def settle(self, key: str, limit: RateLimit, *, estimated: int, actual: int) -> None:
        """Refund (or charge) the difference between the tokens acquired and those used."""
        state = self._states.get(key, _EMPTY)
        self._states[key] = charge(state, limit, tokens=actual - estimated, now=self._clock())

    async def aclose(self) -> None:
        """Nothing to release; here so that every limiter can be closed alike."""
