"""Token-bucket arithmetic, pure (time is an argument) so that a fake clock can test it.

A limiter key has up to two buckets, one of requests and one of tokens, and a "not before"
time set when a provider answered 429 or reported an exhausted window. Each bucket fills
continuously at the per-minute rate, up to a capacity of ``burst_seconds`` worth of it:
that capacity is the burst a key may send at once after being idle.

An absent bucket counts as full. That is what lets Redis expire the buckets of an idle
key: by the time the key expires the bucket would be full anyway, so nothing is granted
that should not be.

The Lua scripts in ``_ratelimit_redis`` do the same arithmetic; change both together.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, replace

__all__ = [
    "DEFAULT_BURST_SECONDS",
    "Bucket",
    "BucketSpec",
    "KeyState",
    "RateLimit",
    "attempt",
    "charge",
    "check_tokens",
    "penalized",
    "refill",
    "wait_for",
]

DEFAULT_BURST_SECONDS = 6.0
"""A tenth of a minute: providers enforce per-minute limits over shorter windows
(OpenAI: "60,000 requests/minute may be enforced as 1,000 requests/second"), so letting a
whole minute's worth go at once would trade the limiter's wait for the provider's 429."""


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """How fast one bucket fills (units per second) and how much it holds."""

    rate: float
    capacity: float


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Requests and tokens per minute for one key; ``None`` leaves that dimension unlimited.

    ``burst_seconds`` sizes the buckets: an idle key may send that many seconds' worth of
    its rate at once (never less than one request, or one token).
    """

    requests_per_minute: float | None
    tokens_per_minute: float | None
    _: KW_ONLY
    burst_seconds: float = DEFAULT_BURST_SECONDS

    def __post_init__(self) -> None:
        for name in ("requests_per_minute", "tokens_per_minute", "burst_seconds"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, not {value!r}")

    @property
    def requests(self) -> BucketSpec | None:
        return _spec(self.requests_per_minute, self.burst_seconds)

    @property
    def tokens(self) -> BucketSpec | None:
        return _spec(self.tokens_per_minute, self.burst_seconds)


def _spec(per_minute: float | None, burst_seconds: float) -> BucketSpec | None:
    if per_minute is None:
        return None
    rate = per_minute / 60.0
    return BucketSpec(rate=rate, capacity=max(1.0, rate * burst_seconds))


@dataclass(frozen=True, slots=True)
class Bucket:
    """The level of a bucket as of ``updated``; a negative level is a debt to wait out."""

    level: float
    updated: float


@dataclass(frozen=True, slots=True)
class KeyState:
    """Everything a limiter remembers about one key."""

    requests: Bucket | None = None
    tokens: Bucket | None = None
    not_before: float = 0.0


def refill(bucket: Bucket | None, spec: BucketSpec, *, now: float) -> Bucket:
    """The bucket as of ``now``: what flowed in since it was last updated, up to capacity."""
    if bucket is None:
        return Bucket(spec.capacity, now)
    elapsed = max(0.0, now - bucket.updated)
    return Bucket(min(spec.capacity, bucket.level + elapsed * spec.rate), max(now, bucket.updated))


def wait_for(bucket: Bucket, spec: BucketSpec, *, amount: float) -> float:
    """Seconds until ``amount`` is in the bucket.

    More than the capacity can never be in it, so such an amount only waits for a full
    bucket and then leaves a debt: one large prompt is slowed down, not refused forever.
    """
    need = min(amount, spec.capacity)
    if bucket.level >= need:
        return 0.0
    return (need - bucket.level) / spec.rate


def attempt(
    state: KeyState, limit: RateLimit, *, tokens: int, now: float
) -> tuple[KeyState, float]:
    """Take one request and ``tokens`` tokens if all are there, else the seconds to wait.

    All or nothing: a caller that has to wait holds nothing meanwhile, so cancelling a
    waiting step leaks no capacity.
    """
    if now < state.not_before:
        return state, state.not_before - now
    wait = 0.0
    requests, token_bucket = state.requests, state.tokens
    if (spec := limit.requests) is not None:
        requests = refill(requests, spec, now=now)
        wait = max(wait, wait_for(requests, spec, amount=1))
        requests = Bucket(requests.level - 1, requests.updated)
    if (spec := limit.tokens) is not None:
        token_bucket = refill(token_bucket, spec, now=now)
        wait = max(wait, wait_for(token_bucket, spec, amount=tokens))
        token_bucket = Bucket(token_bucket.level - tokens, token_bucket.updated)
    if wait > 0:
        return state, wait
    return replace(state, requests=requests, tokens=token_bucket), 0.0


def charge(state: KeyState, limit: RateLimit, *, tokens: float, now: float) -> KeyState:
    """Take ``tokens`` more (negative: give them back) once the real usage is known.

    A refund fills up to capacity at most; a charge may leave a debt, which the next
    acquisitions wait out, so a run that under-estimated still pays for what it used.
    """
    spec = limit.tokens
    if spec is None or tokens == 0:
        return state
    bucket = refill(state.tokens, spec, now=now)
    level = bucket.level - tokens
    if tokens < 0:
        level = min(level, spec.capacity)
    return replace(state, tokens=Bucket(level, bucket.updated))


def check_tokens(tokens: int) -> None:
    """Refuse a negative token count: it would silently mint capacity."""
    if tokens < 0:
        raise ValueError(f"tokens must not be negative, not {tokens}")


def penalized(state: KeyState, *, until: float) -> KeyState:
    """Nobody sends before ``until``; an earlier penalty never shortens a later one."""
    return replace(state, not_before=max(state.not_before, until))
