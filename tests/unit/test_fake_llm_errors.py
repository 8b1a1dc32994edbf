"""Scripted failures raise the SDKs' real exception classes: rate limits with Retry-After,
server errors, context length, timeouts, malformed JSON, content filters, garbage bodies."""

from __future__ import annotations

import json
import time
from typing import Any

import anthropic
import openai
import pydantic
import pytest
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI

from conveyor.testing.fake_llm import FakeLLMServer, Reply


class Verdict(pydantic.BaseModel):
    approved: bool
    reason: str


@pytest.fixture
def oai(fake_llm: FakeLLMServer) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=fake_llm.openai_base_url, api_key="test", max_retries=0)


@pytest.fixture
def claude(fake_llm: FakeLLMServer) -> AsyncAnthropic:
    return AsyncAnthropic(base_url=fake_llm.anthropic_base_url, api_key="test", max_retries=0)


def user(text: str = "hello") -> list[Any]:
    return [{"role": "user", "content": text}]


async def ask_openai(client: AsyncOpenAI, **extra: Any) -> Any:
    return await client.chat.completions.create(model="gpt-4o-mini", messages=user(), **extra)


async def ask_claude(client: AsyncAnthropic, **extra: Any) -> Any:
    return await client.messages.create(
        model="claude-haiku-4-5", max_tokens=100, messages=user(), **extra
    )


async def test_openai_rate_limit_with_retry_after(
    fake_llm: FakeLLMServer, oai: AsyncOpenAI
) -> None:
    fake_llm.script("gpt-4o-mini", Reply(status=429, retry_after=3))

    with pytest.raises(openai.RateLimitError) as caught:
        await ask_openai(oai)

    error = caught.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert error.type == "requests"
    assert error.response.headers["retry-after"] == "3"
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.response.headers["x-ratelimit-reset-requests"] == "3s"


async def test_anthropic_rate_limit_with_retry_after(
    fake_llm: FakeLLMServer, claude: AsyncAnthropic
) -> None:
    fake_llm.script("claude-haiku-4-5", Reply(status=429, retry_after=2.5, message="slow down"))

    with pytest.raises(anthropic.RateLimitError) as caught:
        await ask_claude(claude)

    error = caught.value
    assert error.status_code == 429
    assert error.response.headers["retry-after"] == "2.5"
    assert error.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert isinstance(error.body, dict)
    assert error.body["type"] == "error"
    assert error.body["error"] == {"type": "rate_limit_error", "message": "slow down"}


async def test_sdk_retries_honour_retry_after(fake_llm: FakeLLMServer) -> None:
    fake_llm.script(None, Reply(status=429, retry_after=0.2), Reply(text="after the wait"))
    client = AsyncOpenAI(base_url=fake_llm.openai_base_url, api_key="test", max_retries=1)

    started = time.monotonic()
    completion = await ask_openai(client)

    assert completion.choices[0].message.content == "after the wait"
    assert time.monotonic() - started >= 0.2
    assert [r.headers["x-stainless-retry-count"] for r in fake_llm.requests] == ["0", "1"]


async def test_server_errors(
    fake_llm: FakeLLMServer, oai: AsyncOpenAI, claude: AsyncAnthropic
) -> None:
    fake_llm.script(None, Reply(status=500), Reply(status=503), Reply(status=500))
    fake_llm.script("claude-haiku-4-5", Reply(status=529))

    with pytest.raises(openai.InternalServerError) as first:
        await ask_openai(oai)
    with pytest.raises(openai.InternalServerError) as second:
        await ask_openai(oai)
    with pytest.raises(anthropic.OverloadedError) as overloaded:
        await ask_claude(claude)
    with pytest.raises(anthropic.InternalServerError) as internal:
        await ask_claude(claude)

    assert first.value.type == "server_error"
    assert second.value.status_code == 503
    assert isinstance(overloaded.value.body, dict)
    assert overloaded.value.body["error"]["type"] == "overloaded_error"
    assert isinstance(internal.value.body, dict)
    assert internal.value.body["error"]["type"] == "api_error"


async def test_context_length_exceeded(
    fake_llm: FakeLLMServer, oai: AsyncOpenAI, claude: AsyncAnthropic
) -> None:
    fake_llm.script(None, *[Reply(status=400, code="context_length_exceeded")] * 2)

    with pytest.raises(openai.BadRequestError) as too_long:
        await ask_openai(oai)
    with pytest.raises(anthropic.BadRequestError) as prompt_too_long:
        await ask_claude(claude)

    assert too_long.value.code == "context_length_exceeded"
    assert too_long.value.param == "messages"
    assert "maximum context length" in too_long.value.message
    assert isinstance(prompt_too_long.value.body, dict)
    assert prompt_too_long.value.body["error"]["type"] == "invalid_request_error"
    assert "prompt is too long" in prompt_too_long.value.body["error"]["message"]


async def test_errors_come_before_a_stream(fake_llm: FakeLLMServer, oai: AsyncOpenAI) -> None:
    fake_llm.script(None, Reply(status=429, retry_after=1))

    with pytest.raises(openai.RateLimitError):
        await ask_openai(oai, stream=True)


async def test_slow_response_times_out_in_both_sdks(fake_llm: FakeLLMServer) -> None:
    fake_llm.script(None, Reply(delay=2.0), Reply(delay=2.0))
    oai = AsyncOpenAI(base_url=fake_llm.openai_base_url, api_key="test", max_retries=0, timeout=0.2)
    claude = AsyncAnthropic(
        base_url=fake_llm.anthropic_base_url, api_key="test", max_retries=0, timeout=0.2
    )

    with pytest.raises(openai.APITimeoutError):
        await ask_openai(oai)
    with pytest.raises(anthropic.APITimeoutError):
        await ask_claude(claude)


async def test_slow_response_within_the_timeout_arrives(
    fake_llm: FakeLLMServer, oai: AsyncOpenAI
) -> None:
    fake_llm.script(None, Reply(text="eventually", delay=0.3))

    started = time.monotonic()
    completion = await ask_openai(oai)

    assert completion.choices[0].message.content == "eventually"
    assert time.monotonic() - started >= 0.3


async def test_malformed_json_content(
    fake_llm: FakeLLMServer, oai: AsyncOpenAI, claude: AsyncAnthropic
) -> None:
    fake_llm.script(None, *[Reply(malformed=True)] * 3)

    raw = await ask_openai(oai, response_format={"type": "json_object"})
    with pytest.raises(pydantic.ValidationError):
        await oai.chat.completions.parse(
            model="gpt-4o-mini", messages=user(), response_format=Verdict
        )
    schema = Verdict.model_json_schema() | {"additionalProperties": False}
    message = await ask_claude(
        claude, output_config={"format": {"type": "json_schema", "schema": schema}}
    )

    for text in (raw.choices[0].message.content, message.content[0].text):
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


async def test_malformed_tool_arguments(fake_llm: FakeLLMServer, oai: AsyncOpenAI) -> None:
    fake_llm.script(None, Reply(malformed=True))
    tool: Any = {"type": "function", "function": {"name": "lookup", "parameters": {}}}

    completion = await ask_openai(oai, tools=[tool], tool_choice="required")

    [call] = completion.choices[0].message.tool_calls
    assert call.function.name == "lookup"
    with pytest.raises(json.JSONDecodeError):
        json.loads(call.function.arguments)


async def test_openai_content_filter_and_refusal(fake_llm: FakeLLMServer, oai: AsyncOpenAI) -> None:
    fake_llm.script(
        None,
        Reply(finish_reason="content_filter"),
        Reply(finish_reason="content_filter"),
        Reply(refusal="I can't assist with that."),
    )

    filtered = await ask_openai(oai)
    with pytest.raises(openai.ContentFilterFinishReasonError):
        await oai.chat.completions.parse(
            model="gpt-4o-mini", messages=user(), response_format=Verdict
        )
    refused = await oai.chat.completions.parse(
        model="gpt-4o-mini", messages=user(), response_format=Verdict
    )

    assert filtered.choices[0].finish_reason == "content_filter"
    message = refused.choices[0].message
    assert message.refusal == "I can't assist with that."
    assert message.content is None
    assert message.parsed is None


async def test_garbage_body(fake_llm: FakeLLMServer, oai: AsyncOpenAI) -> None:
    fake_llm.script(None, Reply(raw_body=b"<html>502 Bad Gateway</html>", status=502))
    fake_llm.script(None, Reply(raw_body="{not json"))

    with pytest.raises(openai.InternalServerError) as gateway:
        await ask_openai(oai)
    with pytest.raises(json.JSONDecodeError):  # what the SDK lets through for a 200
        await ask_openai(oai)

    assert gateway.value.status_code == 502
    assert gateway.value.body == "<html>502 Bad Gateway</html>"
