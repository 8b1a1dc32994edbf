"""Token-bucket arithmetic of the LLM rate limiter, with time as a plain number."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.step_runner.llm.ratelimit import (
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

T0 = 1_000.0
SPEC = BucketSpec(rate=1.0, capacity=6.0)


def test_buckets_hold_burst_seconds_of_the_rate() -> None:
    limit = RateLimit(60, 90_000)
    assert limit.requests == BucketSpec(rate=1.0, capacity=6.0)
    assert limit.tokens == BucketSpec(rate=1_500.0, capacity=9_000.0)
    assert RateLimit(60, None, burst_seconds=2).requests == BucketSpec(rate=1.0, capacity=2.0)


def test_a_slow_limit_still_allows_one_request() -> None:
    assert RateLimit(3, None).requests == BucketSpec(rate=0.05, capacity=1.0)


def test_none_leaves_a_dimension_unlimited() -> None:
    limit = RateLimit(None, None)
    assert limit.requests is None
    assert limit.tokens is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"requests_per_minute": 0, "tokens_per_minute": None},
        {"requests_per_minute": None, "tokens_per_minute": -5},
        {"requests_per_minute": 60, "tokens_per_minute": None, "burst_seconds": 0},
    ],
)
def test_limits_must_be_positive(kwargs: dict[str, float | None]) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        RateLimit(**kwargs)  # type: ignore[arg-type]


def test_an_absent_bucket_is_full() -> None:
    assert refill(None, SPEC, now=T0) == Bucket(6.0, T0)


def test_refill_flows_at_the_rate_up_to_capacity() -> None:
    empty = Bucket(0.0, T0)
    assert refill(empty, SPEC, now=T0 + 2.5) == Bucket(2.5, T0 + 2.5)
    assert refill(empty, SPEC, now=T0 + 60) == Bucket(6.0, T0 + 60)


def test_refill_repays_a_debt_first() -> None:
    assert refill(Bucket(-3.0, T0), SPEC, now=T0 + 4) == Bucket(1.0, T0 + 4)


def test_a_clock_that_steps_back_neither_fills_nor_rewinds() -> None:
    assert refill(Bucket(2.0, T0), SPEC, now=T0 - 10) == Bucket(2.0, T0)


def test_waiting_time_is_the_shortfall_over_the_rate() -> None:
    assert wait_for(Bucket(6.0, T0), SPEC, amount=6) == 0.0
    assert wait_for(Bucket(0.5, T0), SPEC, amount=1) == pytest.approx(0.5)
    assert wait_for(Bucket(-2.0, T0), SPEC, amount=1) == pytest.approx(3.0)


def test_more_than_the_capacity_only_waits_for_a_full_bucket() -> None:
    assert wait_for(Bucket(4.0, T0), SPEC, amount=100) == pytest.approx(2.0)
    assert wait_for(Bucket(6.0, T0), SPEC, amount=100) == 0.0


def test_a_burst_of_capacity_then_one_per_interval() -> None:
    limit = RateLimit(60, None)  # 1/s, burst of 6
    state = KeyState()
    for _ in range(6):
        state, wait = attempt(state, limit, tokens=0, now=T0)
        assert wait == 0.0
    state, wait = attempt(state, limit, tokens=0, now=T0)
    assert wait == pytest.approx(1.0)
    state, wait = attempt(state, limit, tokens=0, now=T0 + 0.4)
    assert wait == pytest.approx(0.6)
    state, wait = attempt(state, limit, tokens=0, now=T0 + 1.0)
    assert wait == 0.0


def test_attempt_is_all_or_nothing() -> None:
    limit = RateLimit(60, 600)  # tokens: 10/s, capacity 60
    state, wait = attempt(KeyState(), limit, tokens=50, now=T0)
    assert wait == 0.0
    before = state
    state, wait = attempt(state, limit, tokens=30, now=T0)
    assert wait == pytest.approx(2.0)  # 20 tokens short at 10/s
    assert state is before  # the request that had to wait took no request either


def test_the_longest_wait_of_the_two_buckets_wins() -> None:
    limit = RateLimit(60, 600)
    state = KeyState(requests=Bucket(-4.0, T0), tokens=Bucket(0.0, T0))
    _, wait = attempt(state, limit, tokens=10, now=T0)
    assert wait == pytest.approx(5.0)


def test_a_large_prompt_leaves_a_debt_instead_of_waiting_forever() -> None:
    limit = RateLimit(None, 600)  # capacity 60 tokens
    state, wait = attempt(KeyState(), limit, tokens=250, now=T0)
    assert wait == 0.0
    assert state.tokens == Bucket(-190.0, T0)
    _, wait = attempt(state, limit, tokens=10, now=T0)
    assert wait == pytest.approx(20.0)


def test_unlimited_key_is_never_made_to_wait() -> None:
    state, wait = attempt(KeyState(), RateLimit(None, None), tokens=10**9, now=T0)
    assert wait == 0.0
    assert state == KeyState()


def test_a_penalty_holds_every_request_until_its_end() -> None:
    state = penalized(KeyState(), until=T0 + 30)
    _, wait = attempt(state, RateLimit(None, None), tokens=0, now=T0 + 10)
    assert wait == pytest.approx(20.0)
    _, wait = attempt(state, RateLimit(None, None), tokens=0, now=T0 + 30)
    assert wait == 0.0


def test_a_shorter_penalty_never_shortens_a_longer_one() -> None:
    state = penalized(penalized(KeyState(), until=T0 + 30), until=T0 + 5)
    assert state.not_before == T0 + 30


def test_settle_refunds_what_was_not_used() -> None:
    limit = RateLimit(None, 600)
    state, _ = attempt(KeyState(), limit, tokens=50, now=T0)
    state = charge(state, limit, tokens=12 - 50, now=T0)
    assert state.tokens == Bucket(48.0, T0)


def test_a_refund_fills_no_more_than_capacity() -> None:
    limit = RateLimit(None, 600)
    state = charge(KeyState(tokens=Bucket(55.0, T0)), limit, tokens=-1_000, now=T0)
    assert state.tokens == Bucket(60.0, T0)


def test_settle_charges_an_underestimate_as_a_debt() -> None:
    limit = RateLimit(None, 600)
    state, _ = attempt(KeyState(), limit, tokens=50, now=T0)
    state = charge(state, limit, tokens=130 - 50, now=T0)
    assert state.tokens == Bucket(-70.0, T0)
    _, wait = attempt(state, limit, tokens=0, now=T0)
    assert wait == pytest.approx(7.0)


def test_settle_without_a_tokens_limit_changes_nothing() -> None:
    state = KeyState(requests=Bucket(1.0, T0))
    assert charge(state, RateLimit(60, None), tokens=500, now=T0) is state


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(min_value=0, max_value=3, allow_nan=False), min_size=1, max_size=200),
    tokens=st.lists(st.integers(min_value=0, max_value=80), min_size=200, max_size=200),
)
def test_never_more_than_the_burst_plus_the_rate(gaps: list[float], tokens: list[int]) -> None:
    """Whatever the timing, what was granted over [0, t] fits capacity + rate * t."""
    limit = RateLimit(120, 1_200)  # 2 requests/s (capacity 12), 20 tokens/s (capacity 120)
    state, now = KeyState(), T0
    requests_granted, tokens_granted = 0, 0
    for gap, wanted in zip(gaps, tokens, strict=False):
        now += gap
        state, wait = attempt(state, limit, tokens=wanted, now=now)
        if wait == 0.0:
            requests_granted += 1
            tokens_granted += wanted
        elapsed = now - T0
        assert requests_granted <= 12 + 2 * elapsed + 1e-6
        assert tokens_granted <= 120 + 20 * elapsed + 1e-6
