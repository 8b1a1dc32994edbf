"""What guards the providers: the circuit breaker, the rate limiter, the price table and
the output schema, with fake clocks where time matters."""

from __future__ import annotations

import json
from typing import Any

import pytest

from conveyor.contracts.kinds_llm import LlmConfig
from conveyor.step_runner.llm.endpoints import CircuitBreaker
from conveyor.step_runner.llm.errors import RateLimited
from conveyor.step_runner.llm.prices import PriceTable
from conveyor.step_runner.llm.ratelimit import LocalRateLimiter, rate_limit_key
from conveyor.step_runner.llm.schema import OutputSchema, SchemaError
from conveyor.testing.fake_llm import FakeLLMServer, Reply
from tests.unit.test_llm_step import llm_settings, make_step, step_event


class FakeClock:
    """Monotonic time that only moves when someone sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def call(step: Any, **config: Any) -> Any:
    return await step(LlmConfig.model_validate(config), step_event(config))


async def test_circuit_opens_then_half_opens(fake_llm: FakeLLMServer) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=2, cooldown_s=30, clock=clock)
    step = make_step(fake_llm, breaker=breaker)
    fake_llm.script("gpt-4o-mini", Reply(status=500), Reply(status=503))
    config = {"model": "openai/gpt-4o-mini", "fallback": ["anthropic/claude-haiku-4-5"],
              "prompt": "hi"}  # fmt: skip
    for _ in range(2):
        assert (await call(step, **config)).output["model"] == "anthropic/claude-haiku-4-5"
    assert breaker.state("openai") == "open"

    skipped = await call(step, **config)
    first = skipped.output["attempts"][0]
    assert first["error"]["type"] == "server_error"
    assert "circuit open" in first["error"]["message"]
    assert [r.provider for r in fake_llm.requests].count("openai") == 2  # not called

    clock.now += 30
    assert breaker.state("openai") == "half_open"
    recovered = await call(step, **config)
    assert recovered.output["model"] == "openai/gpt-4o-mini"
    assert breaker.state("openai") == "closed"
    await step.aclose()


def test_half_open_lets_one_trial_through_and_a_failed_trial_reopens() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failures=1, cooldown_s=10, clock=clock)
    breaker.record_failure("openai", counts=True)
    assert not breaker.allow("openai")
    clock.now += 10
    assert breaker.allow("openai")
    assert not breaker.allow("openai")  # one trial at a time
    breaker.record_failure("openai", counts=True)
    assert breaker.state("openai") == "open"
    assert breaker.remaining_s("openai") == 10


def test_other_failures_do_not_trip_the_circuit() -> None:
    breaker = CircuitBreaker(failures=2)
    for _ in range(5):
        breaker.record_failure("openai", counts=False)
    assert breaker.state("openai") == "closed"


async def test_a_reached_rate_limit_waits(fake_llm: FakeLLMServer) -> None:
    clock = FakeClock()
    limiter = LocalRateLimiter(clock=clock, sleep=clock.sleep)
    limits = {"openai/gpt-4o-mini": {"requests_per_minute": 60, "burst_seconds": 1}}
    settings = llm_settings(fake_llm, CONVEYOR_LLM_RATE_LIMITS=limits)
    step = make_step(fake_llm, settings=settings, limiter=limiter)
    for _ in range(3):
        await call(step, model="openai/gpt-4o-mini", prompt="hi")
    assert len(fake_llm.requests) == 3
    assert sum(clock.slept) == pytest.approx(2.0)  # one request a second after the first
    await step.aclose()


async def test_retry_after_penalizes_the_key(fake_llm: FakeLLMServer) -> None:
    clock = FakeClock()
    limiter = LocalRateLimiter(clock=clock, sleep=clock.sleep)
    step = make_step(fake_llm, limiter=limiter)
    fake_llm.script("gpt-4o-mini", Reply(status=429, retry_after=5))
    with pytest.raises(RateLimited) as caught:
        await call(step, model="openai/gpt-4o-mini", prompt="hi")
    assert caught.value.retry_after_s == 5
    assert caught.value.retryable
    key = rate_limit_key("openai", "gpt-4o-mini", "test")
    assert limiter._states[key].not_before == pytest.approx(clock.now + 5)
    await call(step, model="openai/gpt-4o-mini", prompt="hi")  # waits out the penalty
    assert sum(clock.slept) == pytest.approx(5.0)
    await step.aclose()


def test_prices_builtin_prefix_and_overrides() -> None:
    table = PriceTable({"openai/gpt-4o": [1, 2], "local/llama3": {"input": 0.1, "output": 0.2}})
    assert table.cost("openai", "gpt-4o", tokens_in=1_000_000, tokens_out=0) == 1
    # A dated snapshot costs what its family costs; the longest family name wins.
    mini = table.cost("openai", "gpt-4o-mini-2024-07-18", tokens_in=1_000_000, tokens_out=0)
    assert mini == pytest.approx(0.15)
    assert table.cost("local", "llama3", tokens_in=0, tokens_out=1_000_000) == pytest.approx(0.2)
    assert table.lookup("openai", "made-up") is None
    with pytest.raises(ValueError, match="CONVEYOR_LLM_PRICES"):
        PriceTable({"x/y": "cheap"})


def test_compact_schema() -> None:
    schema = OutputSchema.parse({"title": "string", "tags": ["string"], "note": "string?"})
    assert schema.strict
    assert schema.schema["required"] == ["title", "tags", "note"]
    answer = {"title": "t", "tags": ["a"], "note": None}
    assert schema.validate(json.dumps(answer)) == answer
    assert schema.validate("```json\n" + json.dumps(answer) + "\n```") == answer
    with pytest.raises(ValueError, match="tags"):
        schema.validate('{"title": "t", "tags": "a", "note": null}')
    with pytest.raises(ValueError, match="Extra inputs"):
        schema.validate(json.dumps({**answer, "more": 1}))
    with pytest.raises(ValueError, match="Invalid JSON"):
        schema.validate('{"title": ')


def test_json_schema_detection_and_strictness() -> None:
    loose = OutputSchema.parse(
        {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}},
         "required": ["a"]}
    )  # fmt: skip
    assert not loose.strict  # b is optional: OpenAI's strict mode would refuse it
    assert loose.validate('{"a": 1}') == {"a": 1}
    with pytest.raises(ValueError, match="b"):
        loose.validate('{"a": 1, "b": "z"}')
    # A field called "type" next to other fields is the shorthand, not a JSON Schema.
    compact = OutputSchema.parse({"type": "string", "name": "string"})
    assert set(compact.schema["properties"]) == {"type", "name"}
    wrapped = OutputSchema.parse({"type": "string"})
    assert wrapped.wrapped
    assert wrapped.validate('{"value": "hi"}') == "hi"
    with pytest.raises(SchemaError, match="unknown type"):
        OutputSchema.parse({"title": "strng"})
