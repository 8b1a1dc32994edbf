"""The llm step through the real openai and anthropic SDKs against the fake provider."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from conveyor.contracts import StepReady
from conveyor.contracts.kinds_llm import LlmConfig
from conveyor.step_runner.llm.cache import LocalAnswerCache
from conveyor.step_runner.llm.errors import (
    InvalidOutput,
    ProviderError,
    ProviderNotConfigured,
    ProviderServerError,
    RateLimited,
)
from conveyor.step_runner.llm.ratelimit import LocalRateLimiter
from conveyor.step_runner.llm.step import LlmStep
from conveyor.step_runner.settings import LlmSettings
from conveyor.testing.fake_llm import FakeLLMServer, Reply


def llm_settings(fake: FakeLLMServer | None, **overrides: Any) -> LlmSettings:
    """Settings pointing both providers at ``fake``, and nothing read from the environment."""
    values: dict[str, Any] = {
        "OPENAI_API_KEY": "test" if fake else None,
        "OPENAI_BASE_URL": fake.openai_base_url if fake else None,
        "ANTHROPIC_API_KEY": "test" if fake else None,
        "ANTHROPIC_BASE_URL": fake.anthropic_base_url if fake else None,
        "CONVEYOR_REDIS_URL": None,
        **overrides,
    }
    return LlmSettings.model_validate(values)


def make_step(fake: FakeLLMServer | None, **kwargs: Any) -> LlmStep:
    settings = kwargs.pop("settings", None) or llm_settings(fake)
    kwargs.setdefault("limiter", LocalRateLimiter())
    kwargs.setdefault("cache", LocalAnswerCache())
    return LlmStep(settings, **kwargs)


def step_event(config: dict[str, Any]) -> StepReady:
    return StepReady(
        run_id=uuid.uuid4(), pipeline="p", version=1, step_id="draft", attempt=1,
        kind="llm", config=config,
    )  # fmt: skip


async def run(step: LlmStep, **config: Any) -> Any:
    model = LlmConfig.model_validate(config)
    try:
        return await step(model, step_event(config))
    finally:
        await step.aclose()


@pytest.mark.parametrize(
    ("model", "provider"),
    [("openai/gpt-4o-mini", "openai"), ("anthropic/claude-haiku-4-5", "anthropic")],
)
async def test_plain_completion(fake_llm: FakeLLMServer, model: str, provider: str) -> None:
    fake_llm.script(model.split("/")[1], Reply(text="Otters hold hands.", usage=(10, 4)))
    result = await run(make_step(fake_llm), model=model, system="Be terse.", prompt="Otters?",
                       temperature=0.2, max_tokens=50)  # fmt: skip
    packet = result.output
    assert packet["text"] == "Otters hold hands."
    assert packet["json"] is None
    assert packet["model"] == model
    assert packet["finish_reason"] == "stop"
    assert packet["cache_hit"] is False
    assert [a["error"] for a in packet["attempts"]] == [None]
    assert (result.metrics.tokens_in, result.metrics.tokens_out) == (10, 4)
    [request] = fake_llm.requests
    assert request.provider == provider
    if provider == "anthropic":
        assert "temperature" not in request.body
        assert "temperature was not sent to anthropic" in packet["notes"][0]
        assert request.body["system"] == "Be terse."
        assert request.body["max_tokens"] == 50
    else:
        assert request.body["temperature"] == 0.2
        assert request.body["messages"][0] == {"role": "system", "content": "Be terse."}
        assert request.body["max_completion_tokens"] == 50


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "anthropic/claude-haiku-4-5"])
async def test_structured_output(fake_llm: FakeLLMServer, model: str) -> None:
    result = await run(make_step(fake_llm), model=model, prompt="A card about otters",
                       output_schema={"title": "string", "captions": ["string"]})  # fmt: skip
    value = result.output["json"]
    assert isinstance(value["title"], str)
    assert isinstance(value["captions"], list)
    [request] = fake_llm.requests
    if request.provider == "openai":
        spec = request.body["response_format"]["json_schema"]
        assert spec["strict"] is True
        assert spec["schema"]["additionalProperties"] is False
    else:
        fmt = request.body["output_config"]["format"]
        assert fmt["schema"]["required"] == ["title", "captions"]


async def test_json_schema_is_used_as_given(fake_llm: FakeLLMServer) -> None:
    schema = {"type": "array", "items": {"type": "integer"}}
    fake_llm.script("gpt-4o-mini", Reply(json={"value": [1, 2, 3]}))
    result = await run(make_step(fake_llm), model="openai/gpt-4o-mini", prompt="numbers",
                       output_schema=schema)  # fmt: skip
    assert result.output["json"] == [1, 2, 3]


async def test_invalid_output_is_repaired_once(fake_llm: FakeLLMServer) -> None:
    fake_llm.script("gpt-4o-mini", Reply(malformed=True), Reply(json={"title": "Otters"}))
    result = await run(make_step(fake_llm), model="openai/gpt-4o-mini", prompt="card",
                       output_schema={"title": "string"})  # fmt: skip
    assert result.output["json"] == {"title": "Otters"}
    first, second = result.output["attempts"]
    assert first["error"]["type"] == "invalid_output"
    assert second["error"] is None
    repair = fake_llm.requests[1].body["messages"][-1]["content"]
    assert "not valid" in repair


async def test_invalid_output_twice_fails_with_the_raw_answer(fake_llm: FakeLLMServer) -> None:
    fake_llm.script("gpt-4o-mini", Reply(json={"name": 1}), Reply(text="no JSON today"))
    with pytest.raises(InvalidOutput) as caught:
        await run(make_step(fake_llm), model="openai/gpt-4o-mini", prompt="card",
                  output_schema={"title": "string"}, fallback_on=["rate_limit"])  # fmt: skip
    error = caught.value
    assert error.type == "InvalidOutput"
    assert error.retryable is False
    assert error.details is not None
    assert error.details["raw"] == "no JSON today"
    assert len(error.details["attempts"]) == 2
    # both answers were billed: the failure reports their tokens and cost, so they count
    # against the run's budget
    assert error.metrics is not None
    assert error.metrics.tokens_in == sum(a["tokens_in"] for a in error.details["attempts"]) > 0
    assert error.metrics.cost == error.details["usage"]["cost"] > 0


@pytest.mark.parametrize(("status", "cls"), [(429, "rate_limit"), (500, "server_error")])
async def test_fallback_to_the_other_provider(
    fake_llm: FakeLLMServer, status: int, cls: str
) -> None:
    fake_llm.script("gpt-4o-mini", Reply(status=status, retry_after=1))
    result = await run(make_step(fake_llm), model="openai/gpt-4o-mini",
                       fallback=["anthropic/claude-haiku-4-5"], prompt="hi")  # fmt: skip
    packet = result.output
    assert packet["model"] == "anthropic/claude-haiku-4-5"
    first, second = packet["attempts"]
    assert (first["provider"], first["model"]) == ("openai", "gpt-4o-mini")
    assert first["error"]["type"] == cls
    assert (second["provider"], second["error"]) == ("anthropic", None)
    assert [r.provider for r in fake_llm.requests] == ["openai", "anthropic"]


async def test_all_models_failing_is_retryable_with_retry_after(fake_llm: FakeLLMServer) -> None:
    fake_llm.script("gpt-4o-mini", Reply(status=503))
    fake_llm.script("claude-haiku-4-5", Reply(status=429, retry_after=7))
    with pytest.raises(RateLimited) as caught:
        await run(make_step(fake_llm), model="openai/gpt-4o-mini",
                  fallback=["anthropic/claude-haiku-4-5"], prompt="hi")  # fmt: skip
    assert caught.value.retryable is True
    assert caught.value.retry_after_s == 7
    assert [a["error"]["type"] for a in caught.value.details["attempts"]] == [
        "server_error",
        "rate_limit",
    ]


async def test_no_fallback_for_a_class_not_listed(fake_llm: FakeLLMServer) -> None:
    fake_llm.script("gpt-4o-mini", Reply(status=500))
    with pytest.raises(ProviderServerError):
        await run(make_step(fake_llm), model="openai/gpt-4o-mini", fallback_on=["rate_limit"],
                  fallback=["anthropic/claude-haiku-4-5"], prompt="hi")  # fmt: skip
    assert [r.provider for r in fake_llm.requests] == ["openai"]


async def test_a_bad_request_never_falls_back(fake_llm: FakeLLMServer) -> None:
    fake_llm.script("gpt-4o-mini", Reply(status=404))
    with pytest.raises(ProviderError) as caught:
        await run(make_step(fake_llm), model="openai/gpt-4o-mini",
                  fallback=["anthropic/claude-haiku-4-5"], prompt="hi")  # fmt: skip
    assert caught.value.retryable is False
    assert len(fake_llm.requests) == 1


async def test_context_length_falls_back(fake_llm: FakeLLMServer) -> None:
    fake_llm.script("gpt-4o-mini", Reply(status=400, code="context_length_exceeded"))
    result = await run(make_step(fake_llm), model="openai/gpt-4o-mini",
                       fallback="anthropic/claude-haiku-4-5", prompt="long")  # fmt: skip
    assert result.output["attempts"][0]["error"]["type"] == "context_length"


async def test_content_filter_is_its_own_class(fake_llm: FakeLLMServer) -> None:
    fake_llm.script("claude-haiku-4-5", Reply(refusal="I can't help with that."))
    result = await run(make_step(fake_llm), model="anthropic/claude-haiku-4-5",
                       fallback=["openai/gpt-4o-mini"], prompt="x")  # fmt: skip
    assert result.output["attempts"][0]["error"]["type"] == "content_filter"
    assert result.output["model"] == "openai/gpt-4o-mini"


async def test_missing_key_names_the_env_var() -> None:
    with pytest.raises(ProviderNotConfigured) as caught:
        await run(make_step(None), model="anthropic/claude-haiku-4-5", prompt="hi")
    assert "ANTHROPIC_API_KEY" in caught.value.message
    assert caught.value.retryable is False


async def test_unknown_provider_is_explained(fake_llm: FakeLLMServer) -> None:
    with pytest.raises(ProviderNotConfigured, match="CONVEYOR_LLM_ENDPOINTS"):
        await run(make_step(fake_llm), model="ollama/llama3", prompt="hi")


async def test_compatible_endpoint(fake_llm: FakeLLMServer) -> None:
    endpoints = {"local": {"base_url": fake_llm.openai_base_url}}
    step = make_step(fake_llm, settings=llm_settings(fake_llm, CONVEYOR_LLM_ENDPOINTS=endpoints))
    result = await run(step, model="local/llama3", prompt="hi", max_tokens=20)
    assert result.output["model"] == "local/llama3"
    assert result.metrics.cost == 0
    assert "no price for local/llama3" in result.output["notes"][0]
    assert fake_llm.requests[0].body["max_tokens"] == 20


async def test_cost_from_the_price_table(fake_llm: FakeLLMServer) -> None:
    fake_llm.script("gpt-4o-mini", Reply(text="ok", usage=(1_000_000, 1_000_000)))
    result = await run(make_step(fake_llm), model="openai/gpt-4o-mini", prompt="hi")
    assert result.metrics.cost == pytest.approx(0.15 + 0.60)
    assert result.output["usage"]["cost"] == pytest.approx(0.75)


async def test_cost_override_and_failed_billed_attempts(fake_llm: FakeLLMServer) -> None:
    prices = {
        "openai/gpt-4o-mini": {"input": 1.0, "output": 2.0},
        "anthropic/claude-haiku-4-5": [3, 4],
    }
    step = make_step(fake_llm, settings=llm_settings(fake_llm, CONVEYOR_LLM_PRICES=prices))
    fake_llm.script("gpt-4o-mini", Reply(refusal="no", usage=(1000, 10)))
    fake_llm.script("claude-haiku-4-5", Reply(text="ok", usage=(2000, 100)))
    result = await run(step, model="openai/gpt-4o-mini",
                       fallback=["anthropic/claude-haiku-4-5"], prompt="hi")  # fmt: skip
    expected = (1000 * 1 + 10 * 2 + 2000 * 3 + 100 * 4) / 1e6
    assert result.metrics.cost == pytest.approx(expected)
    assert (result.metrics.tokens_in, result.metrics.tokens_out) == (3000, 110)


async def test_cache_hit_skips_the_provider(fake_llm: FakeLLMServer) -> None:
    fake_llm.script("gpt-4o-mini", Reply(text="cached answer", usage=(1000, 1000)))
    step = make_step(fake_llm)
    config = {"model": "openai/gpt-4o-mini", "prompt": "hi", "cache": True}
    first = await step(LlmConfig.model_validate(config), step_event(config))
    second = await step(LlmConfig.model_validate(config), step_event(config))
    other = await step(LlmConfig.model_validate({**config, "prompt": "bye"}), step_event(config))
    await step.aclose()
    assert first.output["cache_hit"] is False
    assert second.output["cache_hit"] is True
    assert second.output["text"] == "cached answer"
    assert second.output["saved_cost"] == pytest.approx(first.metrics.cost)
    assert second.metrics.cost == 0
    assert second.metrics.cache_hit is True
    assert other.output["cache_hit"] is False
    assert len(fake_llm.requests) == 2
