"""The ``llm`` kind: one model answer, with fallbacks, structure, tools, limits and a cache.

For each model of ``[model, *fallback]`` in order, the step holds a conversation: call the
model (through the circuit breaker and the shared rate limiter), run the tools it asks for
and call again (up to ``max_tool_rounds``), and validate a structured answer, asking once
for a repair when it does not validate. A failure moves on to the next model only when its
class is in ``fallback_on``; otherwise, or once no model is left, the step fails with the
last failure's class (retryable for rate limits, server errors and timeouts, so that the
scheduler's retry policy applies, honouring the provider's Retry-After).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from conveyor.contracts import StepReady, parse_duration
from conveyor.contracts.kinds_llm import LlmConfig
from conveyor.contracts.templates import is_truthy
from conveyor.runtime.runner import Executor, InvalidStepConfig, StepOutput
from conveyor.step_runner.http_step import HttpStep
from conveyor.step_runner.llm.cache import AnswerCache, cache_key, create_cache
from conveyor.step_runner.llm.endpoints import CircuitBreaker, ProviderRegistry, Route
from conveyor.step_runner.llm.errors import Failure, ToolRoundsExceeded, step_error
from conveyor.step_runner.llm.packet import StepLedger, cached_output
from conveyor.step_runner.llm.prices import PriceTable
from conveyor.step_runner.llm.providers import Completion, LlmRequest
from conveyor.step_runner.llm.ratelimit import (
    RateLimit,
    RateLimiter,
    create_rate_limiter,
    rate_limit_key,
)
from conveyor.step_runner.llm.schema import OutputSchema, SchemaError
from conveyor.step_runner.llm.tools import ToolBox, result_text, tool_reply, tool_specs
from conveyor.step_runner.settings import LlmSettings
from conveyor.step_runner.transform import run_transform

__all__ = ["DEFAULT_RATE_LIMIT", "LlmStep"]

DEFAULT_RATE_LIMIT = RateLimit(500, 200_000)
"""Per provider+model+key when ``CONVEYOR_LLM_RATE_LIMITS`` names neither it nor a default."""
ESTIMATED_OUTPUT_TOKENS = 1024
"""Output tokens reserved from the limiter when the step sets no ``max_tokens``."""
REPAIR_PROMPT = (
    "Your previous answer was not valid: {problem}. Answer again with only a JSON value "
    "that matches the requested schema, and nothing else."
)


class LlmStep:
    """Executor of the ``llm`` kind; one per process, sharing clients, limiter and cache.

    ``tools`` are the process's executors by kind, which run the steps' tools (default:
    ``transform``, plus ``http`` when ``http`` is given)."""

    def __init__(
        self,
        settings: LlmSettings,
        *,
        tools: Mapping[str, Executor] | None = None,
        http: HttpStep | None = None,
        limiter: RateLimiter | None = None,
        cache: AnswerCache | None = None,
        breaker: CircuitBreaker | None = None,
        registry: ProviderRegistry | None = None,
    ) -> None:
        self._settings = settings
        if tools is None:
            tools = {"transform": run_transform, **({"http": http} if http else {})}
        self._tool_executors = {kind: ex for kind, ex in tools.items() if kind != "llm"}
        self._registry = registry or ProviderRegistry(settings)
        self._limiter = limiter or create_rate_limiter(settings.redis_url)
        self._cache = cache or create_cache(
            settings.redis_url,
            prefix=settings.redis_prefix,
            ttl_s=settings.cache_ttl_s,
            size=settings.cache_size,
        )
        self._breaker = breaker or CircuitBreaker(
            failures=settings.breaker_failures, cooldown_s=settings.breaker_cooldown_s
        )
        self._prices = PriceTable(settings.prices)
        self._limits = {k: _rate_limit(k, v) for k, v in settings.rate_limits.items()}

    async def aclose(self) -> None:
        await self._registry.aclose()
        await self._limiter.aclose()
        await self._cache.aclose()

    async def __call__(self, config: LlmConfig, step: StepReady) -> StepOutput:
        request, options = _prepare(config, default_timeout=self._settings.timeout_s)
        tools = ToolBox(config.tools, executors=self._tool_executors)
        targets = config.models()
        key = None
        if options["cache"]:
            key = cache_key({"models": targets, **_fingerprint(request), "tools": options["tools"]})
            hit = await self._cache.get(key)
            if hit is not None:
                return cached_output(hit)
        ledger = StepLedger(self._prices)
        last: Failure | None = None
        for target in targets:
            route = self._registry.route(target)
            try:
                completion, value = await self._converse(
                    route, request, tools=tools, ledger=ledger, step=step, options=options
                )
            except Failure as failure:
                last = failure
                if failure.cls in config.fallback_on:
                    continue
                break
            result = ledger.output(
                target=target,
                completion=completion,
                value=value,
                structured=request.schema is not None,
            )
            if key is not None:
                await self._cache.set(key, result.output)
            return result
        assert last is not None
        raise step_error(last, details=ledger.details())

    async def _converse(
        self,
        route: Route,
        request: LlmRequest,
        *,
        tools: ToolBox,
        ledger: StepLedger,
        step: StepReady,
        options: dict[str, Any],
    ) -> tuple[Completion, Any]:
        """One model's conversation: tool rounds, then an answer (repaired once)."""
        messages = list(request.messages)
        rounds = 0
        repaired = False
        while True:
            turn = replace(request, model=route.model, messages=messages)
            completion, attempt = await self._attempt(route, turn, ledger)
            if completion.tool_calls:
                if rounds >= options["max_tool_rounds"]:
                    raise ToolRoundsExceeded(
                        f"{route.name}/{route.model} still calls tools after "
                        f"{options['max_tool_rounds']} rounds (max_tool_rounds)",
                        details=ledger.details(),
                        metrics=ledger.metrics(),  # the rounds were billed
                    )
                rounds += 1
                messages = [*messages, _assistant_turn(completion)]
                calls = []
                for call in completion.tool_calls:
                    record = await tools.call(call.name, call.arguments, step)
                    calls.append(record)
                    messages.append(
                        {
                            "role": "tool",
                            "tool_call_id": call.id,
                            "name": call.name,
                            "content": result_text(tool_reply(record)),
                        }
                    )
                ledger.tool_rounds.append({"model": f"{route.name}/{route.model}", "calls": calls})
                continue
            if request.schema is None:
                return completion, None
            try:
                return completion, request.schema.validate(completion.text)
            except ValueError as exc:
                failure = Failure(
                    "invalid_output",
                    f"{route.name}/{route.model} answered invalid JSON for output_schema: {exc}",
                    raw=completion.text,
                )
                attempt["error"] = failure.as_record()
                if repaired:
                    raise failure from None
                repaired = True
                messages = [
                    *messages,
                    {"role": "assistant", "content": completion.text or ""},
                    {"role": "user", "content": REPAIR_PROMPT.format(problem=exc)},
                ]

    async def _attempt(
        self, route: Route, request: LlmRequest, ledger: StepLedger
    ) -> tuple[Completion, dict[str, Any]]:
        """One provider call: breaker, rate limit, call, then what the answer tells them."""
        name, model = route.name, route.model
        if not self._breaker.allow(name):
            failure = Failure(
                "server_error",
                f"{name}: circuit open after repeated failures; skipped for "
                f"{self._breaker.remaining_s(name):.0f}s more",
            )
            ledger.record(provider=name, model=model, latency_ms=0.0, tokens=(0, 0),
                          failure=failure)  # fmt: skip
            raise failure
        if request.temperature is not None and route.provider.ignores_temperature:
            ledger.note(f"temperature was not sent to {name}: its API takes none")
        key = rate_limit_key(name, model, route.api_key)
        limit = self._limit_for(name, model)
        estimate = _estimate_tokens(request)
        await self._limiter.acquire(key, limit, tokens=estimate)
        began = time.perf_counter()
        try:
            completion = await route.provider.complete(request)
        except Failure as failure:
            latency = (time.perf_counter() - began) * 1000
            if failure.headers:
                await self._limiter.observe(key, failure.headers)
            if failure.cls == "rate_limit" and failure.retry_after_s:
                await self._limiter.penalize(key, failure.retry_after_s)
            await self._limiter.settle(key, limit, estimated=estimate, actual=sum(failure.billed))
            self._breaker.record_failure(name, counts=failure.cls in ("server_error", "timeout"))
            ledger.record(provider=name, model=model, latency_ms=latency,
                          tokens=failure.billed, failure=failure)  # fmt: skip
            raise
        latency = (time.perf_counter() - began) * 1000
        await self._limiter.observe(key, completion.headers)
        used = completion.tokens_in + completion.tokens_out
        await self._limiter.settle(key, limit, estimated=estimate, actual=used)
        self._breaker.record_success(name)
        attempt = ledger.record(
            provider=name,
            model=model,
            latency_ms=latency,
            tokens=(completion.tokens_in, completion.tokens_out),
        )
        return completion, attempt

    def _limit_for(self, provider: str, model: str) -> RateLimit:
        for name in (f"{provider}/{model}", provider, "default"):
            if name in self._limits:
                return self._limits[name]
        return DEFAULT_RATE_LIMIT


def _rate_limit(name: str, spec: dict[str, float | None]) -> RateLimit:
    burst = spec.get("burst_seconds")
    try:
        return RateLimit(
            spec.get("requests_per_minute"),
            spec.get("tokens_per_minute"),
            **({"burst_seconds": float(burst)} if burst else {}),
        )
    except ValueError as exc:
        raise ValueError(f"CONVEYOR_LLM_RATE_LIMITS[{name!r}]: {exc}") from None


def _estimate_tokens(request: LlmRequest) -> int:
    """About four characters a token, plus the answer's allowance."""
    chars = sum(len(json.dumps(m.get("content") or "")) for m in request.messages)
    return chars // 4 + (request.max_tokens or ESTIMATED_OUTPUT_TOKENS)


def _assistant_turn(completion: Completion) -> dict[str, Any]:
    calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in completion.tool_calls]
    return {"role": "assistant", "content": completion.text, "tool_calls": calls}


def _fingerprint(request: LlmRequest) -> dict[str, Any]:
    return {
        "messages": request.messages,
        "temperature": request.temperature,
        "max_tokens": request.max_tokens,
        "stop": request.stop,
        "schema": request.schema.schema if request.schema else None,
    }


def _prepare(config: LlmConfig, *, default_timeout: float) -> tuple[LlmRequest, dict[str, Any]]:
    """The rendered config checked once more (numbers may have been templates)."""
    try:
        messages: list[dict[str, Any]] = []
        if config.system:
            messages.append({"role": "system", "content": config.system})
        if config.prompt is not None:
            messages.append({"role": "user", "content": config.prompt})
        else:
            raw = config.messages
            if isinstance(raw, str):
                raise ValueError("messages must render to a list of {role, content}")
            messages.extend({"role": m.role, "content": m.content} for m in raw or [])
        schema_value = config.output_schema
        if isinstance(schema_value, str) and schema_value.lstrip().startswith("{"):
            schema_value = json.loads(schema_value)
        stop = config.stop
        request = LlmRequest(
            model=config.model,
            messages=messages,
            temperature=None if config.temperature is None else float(config.temperature),
            max_tokens=None if config.max_tokens is None else int(config.max_tokens),
            stop=[stop] if isinstance(stop, str) else stop,
            schema=OutputSchema.parse(schema_value) if schema_value is not None else None,
            tools=tool_specs(config.tools),
            timeout=default_timeout if config.timeout is None else parse_duration(config.timeout),
        )
        options = {
            "cache": is_truthy(config.cache),
            "max_tool_rounds": int(config.max_tool_rounds),
            "tools": [t.model_dump(by_alias=True) for t in config.tools],
        }
    except (SchemaError, ValueError, TypeError) as exc:
        raise InvalidStepConfig(f"invalid llm config: {exc}") from None
    return request, options
