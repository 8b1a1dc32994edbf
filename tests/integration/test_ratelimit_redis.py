"""The Redis rate limiter against a real Redis: shared by processes, and surviving its loss.
Also the Redis answer cache's handling of cancellation.

Redis comes from ``CONVEYOR_REDIS_URL``, else ``redis://127.0.0.1:6379/0``; the tests skip
(saying so) when it does not answer. Each test keeps its keys under its own prefix.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio

from conveyor.step_runner.llm._ratelimit_redis import _ACQUIRE, _Script
from conveyor.step_runner.llm.cache import RedisAnswerCache
from conveyor.step_runner.llm.ratelimit import RateLimit, RedisRateLimiter

KEY = "openai/gpt-4o-mini/0123456789ab"

# A runner process in miniature: it says "ready" once imported and connected, reads the
# start time on stdin (so both processes start together however slow their imports), then
# either acquires as fast as it may for a while, or penalises the key once. The import
# leaves ~300,000 objects and a full garbage collection due: collected and frozen before
# "ready", so that it does not stall the measurement instead (2 s on a loaded machine).
_WORKER = r"""
import asyncio, gc, json, sys, time
from conveyor.step_runner.llm.ratelimit import RateLimit, RedisRateLimiter

async def main(mode, url, prefix, key, number, burst, duration):
    limiter = RedisRateLimiter(url, prefix=prefix)
    await limiter._redis.ping()
    gc.collect()
    gc.freeze()
    print("ready", flush=True)
    start_at = float(await asyncio.to_thread(sys.stdin.readline))
    await asyncio.sleep(max(0.0, start_at - time.time()))
    result = {}
    if mode == "penalize":
        await limiter.penalize(key, float(number))
        result["at"] = time.time()
    else:
        limit = RateLimit(float(number), None, burst_seconds=float(burst))
        grants = []

        async def step():
            while True:
                await limiter.acquire(key, limit, tokens=1)
                grants.append(time.time())

        steps = [asyncio.create_task(step()) for _ in range(4)]
        await asyncio.sleep(start_at + float(duration) - time.time())
        for task in steps:
            task.cancel()
        await asyncio.gather(*steps, return_exceptions=True)
        result["grants"] = grants
    result["fell_back"] = limiter._down
    await limiter.aclose()
    print(json.dumps(result), flush=True)

asyncio.run(main(*sys.argv[1:]))
"""
DURATION = 3.0


@pytest.fixture(scope="module")
def redis_url() -> str:
    url = os.environ.get("CONVEYOR_REDIS_URL", "redis://127.0.0.1:6379/0")
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis answers at {url} ({exc}); set CONVEYOR_REDIS_URL to one")
    finally:
        client.close()
    return url


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    prefix = f"conveyor-test:ratelimit:{uuid.uuid4().hex}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
async def limiter(redis_url: str, prefix: str) -> AsyncIterator[RedisRateLimiter]:
    limiter = RedisRateLimiter(redis_url, prefix=prefix)
    yield limiter
    await limiter.aclose()


class Worker:
    """One ``_WORKER`` process."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, *args: str) -> Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _WORKER,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        try:  # importing the step runner takes half a minute on a loaded machine
            ready = await asyncio.wait_for(process.stdout.readline(), timeout=120)
        except BaseException:
            process.kill()
            raise
        if ready != b"ready\n":
            _, err = await process.communicate()
            raise AssertionError(f"the worker did not start: {err.decode()}")
        return cls(process)

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()

    async def result(self, start_at: float) -> dict[str, object]:
        out, err = await asyncio.wait_for(
            self.process.communicate(f"{start_at}\n".encode()), timeout=60
        )
        assert self.process.returncode == 0, err.decode()
        result: dict[str, object] = json.loads(out)
        return result


@pytest.mark.parametrize(
    ("requests_per_minute", "burst_seconds"),
    [(60, 6.0), (1200, 1.0)],
    ids=["60rpm-burst6", "1200rpm-burst20"],
)
async def test_two_processes_share_one_limit(
    redis_url: str, prefix: str, requests_per_minute: int, burst_seconds: float
) -> None:
    rate = (str(requests_per_minute), str(burst_seconds), str(DURATION))
    args = ("acquire", redis_url, prefix, KEY, *rate)
    starts = (Worker.start(*args) for _ in range(2))
    outcomes = await asyncio.gather(*starts, return_exceptions=True)
    workers = [outcome for outcome in outcomes if isinstance(outcome, Worker)]
    try:
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        start_at = time.time() + 0.3
        results = await asyncio.gather(*(worker.result(start_at) for worker in workers))
    finally:  # a failed start or wait must not leave the other worker waiting on its stdin
        for worker in workers:
            worker.kill()

    assert [result["fell_back"] for result in results] == [False, False]
    per_process: list[list[float]] = [list(result["grants"]) for result in results]  # type: ignore[call-overload]
    grants = sorted(g for process in per_process for g in process if g <= start_at + DURATION)
    spec = RateLimit(requests_per_minute, None, burst_seconds=burst_seconds).requests
    assert spec is not None
    allowed = spec.capacity + spec.rate * DURATION
    after_burst = (len(grants) - spec.capacity) / (grants[-1] - start_at)
    print(  # noqa: T201 - the measurement is the point of this test
        f"\n{requests_per_minute} rpm, burst {spec.capacity:g}: {len(grants)} grants in "
        f"{DURATION:g}s ({[len(p) for p in per_process]} per process), allowed {allowed:g}; "
        f"after the burst {after_burst:.2f}/s for a limit of {spec.rate:g}/s"
    )
    # At every moment, not just at the end: never more than the burst plus the rate.
    for count, granted_at in enumerate(grants, start=1):
        assert count <= spec.capacity + spec.rate * (granted_at - start_at) + 1
    assert len(grants) >= allowed - max(2, 0.1 * allowed)  # and waiting wastes little


async def test_a_penalty_from_one_process_holds_the_other(
    redis_url: str, prefix: str, limiter: RedisRateLimiter
) -> None:
    worker = await Worker.start("penalize", redis_url, prefix, KEY, "2.5", "0", "0")
    result = await worker.result(time.time())
    penalized_at = float(result["at"])  # type: ignore[arg-type]

    waited = await limiter.acquire(KEY, RateLimit(None, None), tokens=0)

    assert waited > 0
    assert time.time() >= penalized_at + 2.5 - 0.01
    assert await limiter.acquire(KEY, RateLimit(None, None), tokens=0) == 0.0


async def test_observed_headers_hold_every_limiter_on_the_key(
    redis_url: str, prefix: str, limiter: RedisRateLimiter
) -> None:
    other = RedisRateLimiter(redis_url, prefix=prefix)
    try:
        await limiter.observe(KEY, {"retry-after-ms": "800"})
        waited = await other.acquire(KEY, RateLimit(60, None), tokens=1)
    finally:
        await other.aclose()
    assert 0.6 <= waited <= 1.5


async def test_tokens_are_shared_and_settled(
    redis_url: str, prefix: str, limiter: RedisRateLimiter
) -> None:
    other = RedisRateLimiter(redis_url, prefix=prefix)
    limit = RateLimit(None, 600)  # 10 tokens/s, capacity 60
    try:
        assert await limiter.acquire(KEY, limit, tokens=60) == 0.0
        await limiter.settle(KEY, limit, estimated=60, actual=20)  # 40 back
        assert await other.acquire(KEY, limit, tokens=40) == 0.0
        await other.settle(KEY, limit, estimated=40, actual=43)  # 3 more: a debt
        waited = await limiter.acquire(KEY, limit, tokens=2)
    finally:
        await other.aclose()
    assert 0.4 <= waited <= 1.0  # 5 tokens at 10/s


async def test_idle_keys_expire(redis_url: str, prefix: str, limiter: RedisRateLimiter) -> None:
    await limiter.acquire(KEY, RateLimit(60, 600), tokens=30)
    await limiter.penalize(KEY, 2.0)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        ttls = {
            part: await client.pttl(f"{prefix}:{{{KEY}}}:{part}")
            for part in ("requests", "tokens", "penalty")
        }
    finally:
        await client.aclose()
    assert 1_000 < ttls["requests"] <= 2_000  # one request refills in 1 s, + 1 s slack
    assert 3_000 < ttls["tokens"] <= 4_000  # 30 tokens at 10/s
    assert 2_000 < ttls["penalty"] <= 3_000


async def test_a_cancelled_waiter_takes_nothing(limiter: RedisRateLimiter) -> None:
    limit = RateLimit(120, None, burst_seconds=0.5)  # 2/s, capacity 1
    await limiter.acquire(KEY, limit, tokens=0)
    waiter = asyncio.create_task(limiter.acquire(KEY, limit, tokens=0))
    await asyncio.sleep(0.1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.sleep(0.45)
    assert await limiter.acquire(KEY, limit, tokens=0) < 0.1


async def _cancel_at_each_tick(call: Callable[[], Awaitable[Any]]) -> list[int]:
    """Run ``call`` again and again, cancelling it after 0, 1, 2... event-loop ticks until
    it finishes first; each cancelled run must raise CancelledError. Returns the tick
    counts at which it was cancelled."""
    cancelled_at = []
    for ticks in range(100):
        task = asyncio.ensure_future(call())
        for _ in range(ticks):
            await asyncio.sleep(0)
        if task.done():
            break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled_at.append(ticks)
    return cancelled_at


async def test_a_cancel_during_a_redis_call_is_never_lost(limiter: RedisRateLimiter) -> None:
    # Cancelled at each event-loop tick of an acquire, the acquire raises CancelledError
    # (unless it was already done). On Python 3.11 redis-py's asyncio.wait_for around the
    # socket write swallows a cancel that lands as the write completes (CPython gh-86296):
    # the acquire then returned as if never cancelled, and a worker's loop never ended.
    limit = RateLimit(None, None)
    await limiter.acquire(KEY, limit, tokens=0)  # connected, the script loaded
    cancelled_at = await _cancel_at_each_tick(lambda: limiter.acquire(KEY, limit, tokens=0))
    assert len(cancelled_at) >= 2  # the sweep reached inside the Redis call
    assert await limiter.acquire(KEY, limit, tokens=0) == 0.0  # and the limiter still works


@pytest.mark.parametrize("call", ["get", "set"])
async def test_a_cancel_during_an_answer_cache_call_is_never_lost(
    redis_url: str, prefix: str, call: str
) -> None:
    """The LLM answer cache goes through redis-py too: a step cancelled while it reads or
    writes the cache must stop there, not go on to call the model."""
    cache = RedisAnswerCache(redis_url, prefix=prefix, ttl_s=60)
    try:
        await cache.set("k", {"output": 1})  # connected

        async def use() -> None:
            if call == "get":
                assert await cache.get("k") == {"output": 1}
            else:
                await cache.set("k", {"output": 1})

        cancelled_at = await _cancel_at_each_tick(use)
        assert len(cancelled_at) >= 2  # the sweep reached inside the Redis call
        assert await cache.get("k") == {"output": 1}  # and the cache still works
    finally:
        await cache.aclose()


async def test_a_script_redis_forgot_is_sent_again(prefix: str, limiter: RedisRateLimiter) -> None:
    never_loaded = _Script.of(f"{_ACQUIRE}\n-- {uuid.uuid4()}")
    keys = [f"{prefix}:{{k}}:{part}" for part in ("requests", "tokens", "penalty")]
    assert await limiter._run(never_loaded, keys, [1, 6, 0, 0, 0]) == "0"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_redis_down_falls_back_to_local_limits(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{_closed_port()}/0")
    limit = RateLimit(120, 600, burst_seconds=0.5)  # 2 requests/s, capacity 1
    with caplog.at_level(logging.WARNING):
        started = time.monotonic()
        assert await limiter.acquire(KEY, limit, tokens=1) == 0.0
        assert time.monotonic() - started < 1.0  # fails fast
        waited = await limiter.acquire(KEY, limit, tokens=1)  # still limited, locally
        await limiter.penalize(KEY, 0.2)
        await limiter.observe(KEY, {"retry-after": "0"})
        await limiter.settle(KEY, limit, estimated=1, actual=2)
        await limiter.aclose()
    assert 0.3 <= waited <= 1.0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per outage, not once per call
    assert "rate limits are per process" in warnings[0].getMessage()


async def test_redis_is_tried_again_after_an_outage(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    target = urlsplit(redis_url)
    port = _closed_port()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def forward(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection(target.hostname, target.port or 6379)
        await asyncio.gather(pipe(client_r, redis_w), pipe(redis_r, client_w))

    limiter = RedisRateLimiter(
        f"redis://127.0.0.1:{port}{target.path}", prefix=prefix, retry_redis_after=0.2
    )
    with caplog.at_level(logging.INFO):
        await limiter.acquire(KEY, RateLimit(60, None), tokens=0)  # Redis "down"
        proxy = await asyncio.start_server(forward, "127.0.0.1", port)
        try:
            await asyncio.sleep(0.3)
            await limiter.acquire(KEY, RateLimit(60, None), tokens=0)
        finally:
            await limiter.aclose()
            proxy.close()
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert await client.exists(f"{prefix}:{{{KEY}}}:requests") == 1
    finally:
        await client.aclose()
    assert any("answers again" in r.getMessage() for r in caplog.records)
