"""The in-process limiter, driven by a fake clock whose sleep moves time forward."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime

import pytest

from conveyor.step_runner.llm.ratelimit import (
    LocalRateLimiter,
    RateLimit,
    RateLimiter,
    RedisRateLimiter,
    create_rate_limiter,
    rate_limit_key,
)

KEY = "openai/gpt-4o-mini/0123456789ab"
PER_SECOND = RateLimit(60, None)  # 1 request/s, burst of 6


class FakeClock:
    """Monotonic time that only moves when someone sleeps."""

    def __init__(self) -> None:
        self.now = 500.0
        self.sleeps: list[float] = []
        self.wall = datetime(2025, 5, 1, 12, 0, 0, tzinfo=UTC)

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)

    def limiter(self) -> LocalRateLimiter:
        return LocalRateLimiter(clock=self, sleep=self.sleep, wall_clock=lambda: self.wall)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_burst_then_one_request_per_interval(clock: FakeClock) -> None:
    limiter = clock.limiter()
    waits = [await limiter.acquire(KEY, PER_SECOND, tokens=0) for _ in range(8)]
    assert waits == [0.0] * 6 + [pytest.approx(1.0), pytest.approx(1.0)]
    assert clock.sleeps == [pytest.approx(1.0), pytest.approx(1.0)]


async def test_keys_are_limited_independently(clock: FakeClock) -> None:
    limiter = clock.limiter()
    for _ in range(6):
        await limiter.acquire(KEY, PER_SECOND, tokens=0)
    other_key = "anthropic/claude-haiku-4-5/abcdef012345"
    assert await limiter.acquire(other_key, PER_SECOND, tokens=0) == 0.0
    assert clock.sleeps == []


async def test_waits_for_tokens(clock: FakeClock) -> None:
    limiter = clock.limiter()
    limit = RateLimit(None, 600)  # 10 tokens/s, capacity 60
    assert await limiter.acquire(KEY, limit, tokens=60) == 0.0
    assert await limiter.acquire(KEY, limit, tokens=25) == pytest.approx(2.5)


async def test_settle_refund_lets_the_next_step_go_at_once(clock: FakeClock) -> None:
    limiter = clock.limiter()
    limit = RateLimit(None, 600)
    await limiter.acquire(KEY, limit, tokens=60)
    await limiter.settle(KEY, limit, estimated=60, actual=15)
    assert await limiter.acquire(KEY, limit, tokens=45) == 0.0


async def test_settle_charge_makes_the_next_step_pay(clock: FakeClock) -> None:
    limiter = clock.limiter()
    limit = RateLimit(None, 600)
    await limiter.acquire(KEY, limit, tokens=10)
    await limiter.settle(KEY, limit, estimated=10, actual=90)  # 50 left - 80 = -30
    assert await limiter.acquire(KEY, limit, tokens=10) == pytest.approx(4.0)


async def test_penalize_holds_the_key_even_without_limits(clock: FakeClock) -> None:
    limiter = clock.limiter()
    await limiter.penalize(KEY, 12.5)
    assert await limiter.acquire(KEY, RateLimit(None, None), tokens=0) == pytest.approx(12.5)
    assert await limiter.acquire(KEY, RateLimit(None, None), tokens=0) == 0.0


async def test_observe_penalizes_until_the_openai_reset(clock: FakeClock) -> None:
    limiter = clock.limiter()
    await limiter.observe(
        KEY, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m30s"}
    )
    assert await limiter.acquire(KEY, PER_SECOND, tokens=0) == pytest.approx(90.0)


async def test_observe_penalizes_until_the_anthropic_reset(clock: FakeClock) -> None:
    limiter = clock.limiter()
    await limiter.observe(
        KEY,
        {
            "anthropic-ratelimit-tokens-remaining": "0",
            "anthropic-ratelimit-tokens-reset": "2025-05-01T12:00:20Z",
        },
    )
    assert await limiter.acquire(KEY, PER_SECOND, tokens=0) == pytest.approx(20.0)


async def test_observe_of_ordinary_headers_changes_nothing(clock: FakeClock) -> None:
    limiter = clock.limiter()
    await limiter.observe(KEY, {"x-ratelimit-remaining-requests": "41", "content-length": "9"})
    assert await limiter.acquire(KEY, PER_SECOND, tokens=0) == 0.0


async def test_a_penalty_arriving_mid_wait_is_honoured(clock: FakeClock) -> None:
    limiter = clock.limiter()
    for _ in range(6):
        await limiter.acquire(KEY, PER_SECOND, tokens=0)
    waiter = asyncio.create_task(limiter.acquire(KEY, PER_SECOND, tokens=0))
    await limiter.penalize(KEY, 30)  # before the waiter's first attempt runs
    assert await waiter == pytest.approx(30.0)


async def test_waiters_are_served_in_arrival_order(clock: FakeClock) -> None:
    """A large prompt queued first is not starved by the small ones behind it."""
    limiter = clock.limiter()
    limit = RateLimit(None, 600)  # 10 tokens/s, capacity 60
    await limiter.acquire(KEY, limit, tokens=60)
    served: list[str] = []

    async def step(name: str, tokens: int) -> None:
        await limiter.acquire(KEY, limit, tokens=tokens)
        served.append(name)

    await asyncio.gather(step("large", 50), step("small-1", 5), step("small-2", 5))
    assert served == ["large", "small-1", "small-2"]


async def test_a_cancelled_waiter_takes_nothing(clock: FakeClock) -> None:
    never = asyncio.Event()

    async def sleep_forever(seconds: float) -> None:
        await never.wait()

    limiter = LocalRateLimiter(clock=clock, sleep=sleep_forever)
    for _ in range(6):
        await limiter.acquire(KEY, PER_SECOND, tokens=0)
    waiter = asyncio.create_task(limiter.acquire(KEY, PER_SECOND, tokens=0))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    clock.now += 1.0  # exactly one request refilled: it is still there to take
    assert await limiter.acquire(KEY, PER_SECOND, tokens=0) == 0.0


async def test_negative_tokens_are_refused(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        await clock.limiter().acquire(KEY, PER_SECOND, tokens=-1)


async def test_real_clock_waits_and_reports_the_wait() -> None:
    limiter = LocalRateLimiter()
    fast = RateLimit(600, None, burst_seconds=0.1)  # 10/s, capacity 1
    assert await limiter.acquire(KEY, fast, tokens=0) == 0.0
    waited = await limiter.acquire(KEY, fast, tokens=0)
    assert 0.08 <= waited <= 0.5


def test_keys_name_provider_and_model_but_never_the_api_key() -> None:
    key = rate_limit_key("openai", "gpt-4o-mini", "sk-secret")
    digest = hashlib.sha256(b"sk-secret").hexdigest()[:12]
    assert key == f"openai/gpt-4o-mini/{digest}"
    assert "sk-secret" not in key
    assert rate_limit_key("openai", "gpt-4o-mini", "sk-other") != key
    assert rate_limit_key("ollama", "llama3", None) == "ollama/llama3/-"


async def test_create_rate_limiter_picks_redis_only_with_a_url() -> None:
    local: RateLimiter = create_rate_limiter(None)
    assert isinstance(local, LocalRateLimiter)
    shared = create_rate_limiter("redis://127.0.0.1:1/0")  # not connected until used
    assert isinstance(shared, RedisRateLimiter)
    await shared.aclose()
    await local.aclose()
