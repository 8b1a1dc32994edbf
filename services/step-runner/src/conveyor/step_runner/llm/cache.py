"""The answer cache of ``cache: true`` steps: in Redis when ``CONVEYOR_REDIS_URL`` is set
(shared by every runner, entries expire after ``CONVEYOR_LLM_CACHE_TTL``), else an LRU in
this process.

The key is the sha256 of everything that shapes an answer: the models tried, the rendered
messages, the sampling parameters, the output schema and the tools. A cache never makes
a step fail: when Redis does not answer, the step calls the provider as if nothing was
cached (with a warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from conveyor.step_runner.llm._redis_cancel import cancel_requests, honour_lost_cancel

__all__ = ["AnswerCache", "LocalAnswerCache", "RedisAnswerCache", "cache_key", "create_cache"]

log = logging.getLogger(__name__)


def cache_key(request: dict[str, Any]) -> str:
    """sha256 of the request's canonical JSON."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class AnswerCache(Protocol):
    async def get(self, key: str) -> dict[str, Any] | None: ...

    async def set(self, key: str, packet: dict[str, Any]) -> None: ...

    async def aclose(self) -> None: ...


class LocalAnswerCache:
    """An LRU of ``size`` packets, each kept for ``ttl_s``; ``clock`` is the test seam."""

    def __init__(
        self, *, size: int = 1024, ttl_s: float = 7 * 86400, clock: Callable[[], float] = time.time
    ) -> None:
        self._size = size
        self._ttl = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()

    async def get(self, key: str) -> dict[str, Any] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires < self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return dict(json.loads(value))

    async def set(self, key: str, packet: dict[str, Any]) -> None:
        # Stored as JSON, so a caller mutating what it got back cannot change the cache.
        self._entries[key] = (self._clock() + self._ttl, json.dumps(packet))
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    async def aclose(self) -> None:
        self._entries.clear()


class RedisAnswerCache:
    """Packets as JSON strings under ``<prefix>:<key>`` with a TTL."""

    def __init__(self, url: str, *, prefix: str = "conveyor:llmcache", ttl_s: float) -> None:
        self._redis: Redis = Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
        self._prefix = prefix
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._warned = False

    # Each call honours a cancellation redis-py lost (see ``honour_lost_cancel``): a step
    # cancelled while it read or wrote the cache stops there instead of calling the model.

    async def get(self, key: str) -> dict[str, Any] | None:
        cancels = cancel_requests()
        try:
            value = await self._redis.get(f"{self._prefix}:{key}")
        except (RedisError, OSError) as exc:
            honour_lost_cancel(cancels)
            self._warn(exc)
            return None
        honour_lost_cancel(cancels)
        self._warned = False
        return dict(json.loads(value)) if value else None

    async def set(self, key: str, packet: dict[str, Any]) -> None:
        cancels = cancel_requests()
        try:
            await self._redis.set(f"{self._prefix}:{key}", json.dumps(packet), px=self._ttl_ms)
        except (RedisError, OSError) as exc:
            honour_lost_cancel(cancels)
            self._warn(exc)
            return
        honour_lost_cancel(cancels)

    def _warn(self, exc: BaseException) -> None:
        if not self._warned:
            log.warning("the LLM answer cache in Redis is unavailable (%r): not caching", exc)
            self._warned = True

    async def aclose(self) -> None:
        await self._redis.aclose()


def create_cache(
    redis_url: str | None, *, prefix: str, ttl_s: float, size: int = 1024
) -> AnswerCache:
    """Redis when a URL is given, else an in-process LRU."""
    if redis_url:
        return RedisAnswerCache(redis_url, prefix=f"{prefix}:llmcache", ttl_s=ttl_s)
    return LocalAnswerCache(size=size, ttl_s=ttl_s)
